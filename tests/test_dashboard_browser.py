"""The dashboard in a real browser (issue 18 points 6 and 7): headless Chromium (Debian's
/usr/bin/chromium, driven by playwright, which never downloads a browser here) against a real
``twistd queen`` process.

Each test saves a screenshot under its tmp_path and fails on any console error or uncaught
page error. The tests that make the API fail on purpose admit exactly the browser's own
"Failed to load resource" lines for those answers, nothing else.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import httpx
import jwt
import pytest

from tests.faultkit import Fleet, private_postgres
from tests.http_helpers import ack, configure, poll_pop, push
from tests.support import ServerProcess, running_server, unique_name, wait_until

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="Debian's chromium is not installed at /usr/bin/chromium (CI installs it: "
           "apt-get install chromium); the dashboard tests never download a browser")

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package (dev extra)")

LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
"""The closed test network refuses Chromium's background connections: none are attempted."""

UI_WAIT_MS = 30_000
"""Ceiling for the page to show what a test waits for (auto-refresh runs every 5 s)."""

SECRET = "dashboard-browser-secret-long-enough-for-hs256"
FAILED_LOAD = re.compile(r"^Failed to load resource: ")


def bearer(role: str = "read-write") -> str:
    """An HS256 token of the JWT server below."""
    now = int(time.time())
    return jwt.encode({"sub": "dashboard-user", "role": role, "iat": now, "exp": now + 3600},
                      SECRET, algorithm="HS256")


class Dashboard:
    """A browser tab on the dashboard that records every console error and page error.

    :param page: the playwright page (a fresh context: its own sessionStorage).
    :param base_url: the server the page is loaded from.
    :param screenshot: where :meth:`finish` (or the fixture, if the test failed first)
        saves the final screenshot.
    """

    def __init__(self, page: Any, base_url: str, screenshot: Path):
        self.page = page
        self.base_url = base_url
        self.screenshot = screenshot
        self.errors: list[str] = []
        self.failed_loads_expected = False
        self.finished = False
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))

    def _console(self, message: Any) -> None:
        if message.type != "error":
            return
        if self.failed_loads_expected and FAILED_LOAD.match(message.text):
            return
        self.errors.append(f"console error: {message.text}")

    def open(self, hash_route: str = "#/") -> None:
        """Load the page at ``hash_route`` and wait for its first render."""
        self.page.goto(f"{self.base_url}/{hash_route}")
        self.page.wait_for_function("() => document.body.dataset.loaded !== undefined",
                                    timeout=UI_WAIT_MS)

    def loaded(self) -> int:
        """How many renders have finished (the page counts them)."""
        return int(self.page.evaluate("Number(document.body.dataset.loaded || 0)"))

    def refresh(self) -> None:
        """Press Refresh and wait for that render to finish."""
        before = self.loaded()
        self.page.click("#refresh-now")
        self.page.wait_for_function(f"() => Number(document.body.dataset.loaded) > {before}",
                                    timeout=UI_WAIT_MS)

    def banner(self) -> Optional[str]:
        """The error banner's text, None while it is hidden."""
        banner = self.page.locator("#banner")
        return banner.inner_text() if banner.is_visible() else None

    def wait_for(self, selector: str) -> Any:
        """The first element matching ``selector`` once it is shown."""
        locator = self.page.locator(selector).first
        locator.wait_for(state="visible", timeout=UI_WAIT_MS)
        return locator

    def finish(self) -> None:
        """Save the screenshot and fail on any error the page logged."""
        self.finished = True
        self.page.screenshot(path=str(self.screenshot), full_page=True)
        assert not self.errors, "\n".join(self.errors)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def dash_server(pg_env: dict[str, str]) -> Iterator[ServerProcess]:
    """A server writing its metrics every second, so the charts fill during a test."""
    with running_server(pg_env, prefix="queen-tw-dashboard-",
                        METRICS_AGGREGATE_INTERVAL_S="1") as process:
        yield process


@pytest.fixture(scope="module")
def jwt_server(pg_env: dict[str, str]) -> Iterator[ServerProcess]:
    with running_server(pg_env, prefix="queen-tw-dashboard-jwt-", JWT_ENABLED="true",
                        JWT_SECRET=SECRET, METRICS_AGGREGATE_INTERVAL_S="1") as process:
        yield process


@pytest.fixture
def open_dashboard(browser: Any, tmp_path: Path) -> Iterator[Callable[[str], Dashboard]]:
    """Opens a fresh tab on a server: ``open_dashboard(server.url)``."""
    contexts: list[Any] = []
    tabs: list[Dashboard] = []

    def opener(base_url: str) -> Dashboard:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        tab = Dashboard(context.new_page(), base_url,
                        tmp_path / f"dashboard-{len(tabs)}.png")
        tabs.append(tab)
        return tab

    try:
        yield opener
    finally:
        for tab in tabs:
            if not tab.finished:
                try:
                    tab.page.screenshot(path=str(tab.screenshot), full_page=True)
                except Exception:  # the page may be what failed; the test already says so
                    pass
        for context in contexts:
            context.close()


@pytest.fixture
def api(dash_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=dash_server.url, timeout=40) as client:
        yield client


def shown_number(text: str) -> int:
    """The integer a card shows (``1,234`` read as 1234; no digits: -1)."""
    digits = re.sub(r"[^0-9]", "", text)
    return int(digits) if digits else -1


# -- the pages ----------------------------------------------------------------------------


def test_overview_shows_a_pushed_queue_and_nonzero_throughput(
        api: httpx.Client, dash_server: ServerProcess,
        open_dashboard: Callable[[str], Dashboard]) -> None:
    queue = unique_name("test-dash-")
    push(api, queue, [{"n": n} for n in range(5)])
    ack(api, poll_pop(api, queue)["messages"][0])
    dashboard = open_dashboard(dash_server.url)

    dashboard.open("#/")
    row = dashboard.wait_for(f'tr[data-queue="{queue}"]')
    wait_until(lambda: shown_number(row.locator("td").nth(2).inner_text()) == 5,
               message="the queue's depth to show 5")  # statistics may lag a refresh
    dashboard.page.wait_for_function(
        """() => {
             const card = document.querySelector('[data-testid="throughput-pushed"] .value');
             return card && Number(card.textContent.replace(/[^0-9]/g, '')) >= 5;
           }""", timeout=UI_WAIT_MS)  # the pushes may span two metrics intervals
    pushed = dashboard.page.inner_text('[data-testid="throughput-pushed"] .value')

    assert row.locator("a").inner_text() == queue
    assert shown_number(pushed) >= 5
    assert dashboard.page.locator("figure.chart path.line").count() >= 1
    assert dashboard.banner() is None
    dashboard.finish()


def test_queue_page_lists_its_partitions(api: httpx.Client, dash_server: ServerProcess,
                                         open_dashboard: Callable[[str], Dashboard]) -> None:
    queue = unique_name("test-dash-")
    group = unique_name("group-")
    partitions = ["alpha", "beta", "gamma"]
    for partition in partitions:
        push(api, queue, [{"p": partition}], partition=partition, prefix=f"{partition}-")
    poll_pop(api, queue, consumerGroup=group, subscriptionMode="all")
    dashboard = open_dashboard(dash_server.url)

    dashboard.open(f"#/queues/{queue}")
    for partition in partitions:
        dashboard.wait_for(f'tr[data-partition="{partition}"]')
    dashboard.wait_for(f'tr[data-group="{group}"]')
    dashboard.wait_for(f'tr[data-lag-group="{group}"]')

    listed = dashboard.page.eval_on_selector_all(
        "tr[data-partition]", "rows => rows.map(row => row.dataset.partition)")
    assert sorted(listed) == partitions
    assert dashboard.page.inner_text("h1") == f"Queue {queue}"
    assert dashboard.wait_for('tr[data-message="beta-0"]').is_visible()
    assert dashboard.banner() is None
    dashboard.finish()


def test_a_dead_letter_left_out_of_a_big_page_says_so(
        api: httpx.Client, dash_server: ServerProcess,
        open_dashboard: Callable[[str], Dashboard]) -> None:
    """Past 64 MiB of payloads a DLQ page leaves the rest out (dataOmitted): the cell says
    so instead of showing null."""
    queue = unique_name("test-dash-")
    configure(api, queue)
    for n in range(3):  # 33 MiB each: 0, 33 and 66 MiB before them, so the oldest is left out
        pushed = push(api, queue, [{"n": n, "text": "z" * (33 * 1024 * 1024)}],
                      prefix=f"big{n}-")[0]
        failed = api.post(f"/api/v1/messages/{pushed['partition_id']}/big{n}-0/dlq",
                          json={}, timeout=120)
        assert failed.status_code == 200, failed.text
    dashboard = open_dashboard(dash_server.url)

    dashboard.open(f"#/dlq/{queue}")

    oldest = dashboard.wait_for('tr[data-dlq-message="big0-0"]')
    assert "too large to list" in oldest.inner_text()
    newest = dashboard.wait_for('tr[data-dlq-message="big2-0"]')
    assert '{"n":2,"text":"zzz' in newest.inner_text().replace(" ", "")
    assert dashboard.banner() is None
    dashboard.finish()


def test_dead_letter_is_listed_and_retry_moves_it_back(
        api: httpx.Client, dash_server: ServerProcess,
        open_dashboard: Callable[[str], Dashboard]) -> None:
    queue = unique_name("test-dash-")
    configure(api, queue)
    pushed = push(api, queue, [{"order": 7}], prefix="order-")[0]
    failed = api.post(f"/api/v1/messages/{pushed['partition_id']}/order-0/dlq",
                      json={"error": "payment service refused"})
    assert failed.status_code == 200, failed.text
    dashboard = open_dashboard(dash_server.url)

    dashboard.open(f"#/dlq/{queue}")
    row = dashboard.wait_for('tr[data-dlq-message="order-0"]')
    assert "payment service refused" in row.inner_text()
    row.locator("button[data-retry]").click()
    dashboard.page.locator('tr[data-dlq-message="order-0"]').wait_for(
        state="detached", timeout=UI_WAIT_MS)

    letters = api.get("/api/v1/dlq", params={"queue": queue}).json()
    copy = api.get(f"/api/v1/messages/{pushed['partition_id']}/order-0:retry:1")
    assert letters["total"] == 0 and letters["messages"] == []
    assert copy.status_code == 200 and copy.json()["status"] == "pending"
    assert copy.json()["payload"] == {"order": 7}
    assert "order-0:retry:1" in dashboard.page.inner_text("#notice")
    assert dashboard.banner() is None
    dashboard.finish()


def test_consumer_groups_page_lists_a_group(api: httpx.Client, dash_server: ServerProcess,
                                            open_dashboard: Callable[[str], Dashboard]) -> None:
    queue = unique_name("test-dash-")
    group = unique_name("group-")
    push(api, queue, [{"n": n} for n in range(3)])
    poll_pop(api, queue, consumerGroup=group, subscriptionMode="all")
    dashboard = open_dashboard(dash_server.url)

    dashboard.open("#/groups")
    row = dashboard.wait_for(f'tr[data-group="{group}"][data-queue="{queue}"]')

    assert queue in row.inner_text()
    assert dashboard.banner() is None
    dashboard.finish()


def test_traces_page_lists_a_trace_name(api: httpx.Client, dash_server: ServerProcess,
                                        open_dashboard: Callable[[str], Dashboard]) -> None:
    if api.get("/api/v1/traces/names").status_code == 404:
        pytest.skip("GET /api/v1/traces/names is not routed by this server yet (WIRE 3.6)")
    queue = unique_name("test-dash-")
    name = f"checkout-{uuid.uuid4().hex[:8]}"
    pushed = push(api, queue, [{"cart": 1}], prefix="cart-")[0]
    traced = api.post("/api/v1/traces", json={
        "transactionId": "cart-0", "partitionId": pushed["partition_id"],
        "traceNames": [name], "data": {"step": "paid"}})
    assert traced.status_code == 201, traced.text
    dashboard = open_dashboard(dash_server.url)

    dashboard.open("#/traces")
    dashboard.wait_for(f'tr[data-trace-name="{name}"] a').click()
    event = dashboard.wait_for("tr[data-trace-event]")

    assert "paid" in event.inner_text() and queue in event.inner_text()
    assert dashboard.banner() is None
    dashboard.finish()


def test_auto_refresh_runs_every_five_seconds_until_paused(
        dash_server: ServerProcess, open_dashboard: Callable[[str], Dashboard]) -> None:
    dashboard = open_dashboard(dash_server.url)
    dashboard.page.clock.install()
    dashboard.open("#/groups")
    first = dashboard.loaded()

    dashboard.page.clock.run_for(5_000)
    dashboard.page.wait_for_function(f"() => Number(document.body.dataset.loaded) > {first}",
                                     timeout=UI_WAIT_MS)
    started = dashboard.page.evaluate("Number(document.body.dataset.started)")
    dashboard.page.uncheck("#auto-refresh")
    dashboard.page.clock.run_for(60_000)

    # a refresh marks its start at once, before any network call
    assert dashboard.page.evaluate("Number(document.body.dataset.started)") == started
    dashboard.finish()


# -- failures: a banner, never a blank page -------------------------------------------------


def test_banner_names_the_status_and_error_of_a_failing_call(
        dash_server: ServerProcess, open_dashboard: Callable[[str], Dashboard]) -> None:
    dashboard = open_dashboard(dash_server.url)
    dashboard.failed_loads_expected = True
    missing = unique_name("test-dash-missing-")

    dashboard.open(f"#/queues/{missing}")
    text = dashboard.wait_for("#banner").inner_text()

    assert f"GET /api/v1/resources/queues/{missing}: HTTP 404: Queue not found" in text
    assert dashboard.page.inner_text("main").strip()  # the page still renders its sections
    dashboard.finish()


def test_banner_shows_when_the_server_is_unreachable(
        make_server: Callable[..., ServerProcess],
        open_dashboard: Callable[[str], Dashboard]) -> None:
    server = make_server()
    dashboard = open_dashboard(server.url)
    dashboard.failed_loads_expected = True
    dashboard.open("#/groups")
    dashboard.wait_for("main h1")

    server.stop()
    dashboard.refresh()

    text = dashboard.banner()
    assert text is not None and "GET /api/v1/consumer-groups: no answer" in text
    assert "cannot be reached" in text
    assert dashboard.page.inner_text("main h1") == "Consumer groups"
    dashboard.finish()


def test_with_jwt_the_page_loads_and_works_once_a_token_is_entered(
        jwt_server: ServerProcess, open_dashboard: Callable[[str], Dashboard]) -> None:
    token = bearer()
    queue = unique_name("test-dash-jwt-")
    with httpx.Client(base_url=jwt_server.url, timeout=40,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        push(client, queue, [{"secured": True}], partition="only")
    dashboard = open_dashboard(jwt_server.url)
    dashboard.failed_loads_expected = True  # the calls made before the token is entered

    dashboard.open(f"#/queues/{queue}")
    refused = dashboard.wait_for("#banner").inner_text()
    dashboard.page.fill("#token", token)
    dashboard.page.click("#token-form button[type=submit]")
    dashboard.wait_for('tr[data-partition="only"]')
    dashboard.failed_loads_expected = False  # from here on, every call carries the token
    dashboard.refresh()
    stored = dashboard.page.evaluate("sessionStorage.getItem('queen-tw.token')")

    assert "HTTP 401: Authentication required" in refused
    assert "Token field" in refused
    assert stored == token
    assert dashboard.banner() is None
    assert dashboard.page.inner_text("#token-state") == "token set"
    dashboard.finish()


def test_a_refused_retry_stays_on_the_banner_across_the_next_refresh(
        api: httpx.Client, dash_server: ServerProcess,
        open_dashboard: Callable[[str], Dashboard]) -> None:
    queue = unique_name("test-dash-")
    configure(api, queue)
    pushed = push(api, queue, [{"order": 8}], prefix="gone-")[0]
    api.post(f"/api/v1/messages/{pushed['partition_id']}/gone-0/dlq", json={}).raise_for_status()
    dashboard = open_dashboard(dash_server.url)
    dashboard.failed_loads_expected = True
    dashboard.open(f"#/dlq/{queue}")
    row = dashboard.wait_for('tr[data-dlq-message="gone-0"]')
    api.delete(f"/api/v1/messages/{pushed['partition_id']}/gone-0").raise_for_status()

    row.locator("button[data-retry]").click()
    dashboard.wait_for("#banner")
    dashboard.refresh()  # what the auto-refresh does every 5 s

    text = dashboard.banner()
    assert text is not None and "/retry: HTTP 404" in text, text
    dashboard.finish()


def test_a_hash_that_is_no_escape_renders_a_page_without_an_error(
        dash_server: ServerProcess, open_dashboard: Callable[[str], Dashboard]) -> None:
    dashboard = open_dashboard(dash_server.url)
    dashboard.failed_loads_expected = True  # the queue "%E0%A4" does not exist: 404
    dashboard.open("#/traces")
    before = dashboard.loaded()

    dashboard.page.evaluate("location.hash = '#/queues/%E0%A4'")
    dashboard.page.wait_for_function(f"() => Number(document.body.dataset.loaded) > {before}",
                                     timeout=UI_WAIT_MS)

    assert "Traces" not in dashboard.page.inner_text("main h1")
    dashboard.finish()  # no uncaught "URI malformed"


def test_a_hung_postgresql_shows_on_the_banner_not_as_stale_healthy_data(
        open_dashboard: Callable[[str], Dashboard]) -> None:
    """Calls that hang longer than the refresh period: each auto-refresh used to overtake
    the last, none finished, and the page showed the data from before the hang as current."""
    with private_postgres() as postgres:
        fleet = Fleet(postgres.pg_env())
        try:
            server = fleet.server()
            dashboard = open_dashboard(server.url)
            dashboard.failed_loads_expected = True
            dashboard.open("#/groups")
            postgres.freeze()
            try:
                banner = dashboard.page.locator("#banner")
                banner.wait_for(state="visible", timeout=60_000)  # calls end at 15 s
                text = banner.inner_text()
            finally:
                postgres.thaw()
        finally:
            fleet.close()
    assert "/api/v1/consumer-groups" in text, text
    dashboard.finish()


def test_the_queue_page_lists_its_newest_messages_of_any_age(
        api: httpx.Client, dash_server: ServerProcess, db: Any,
        open_dashboard: Callable[[str], Dashboard]) -> None:
    """The page asked /api/v1/messages without a range, whose default is the last hour: a
    queue whose messages were two hours old listed none."""
    queue = unique_name("test-dash-old-")
    push(api, queue, [{"n": n} for n in range(3)], prefix="old-")
    with db.cursor() as cursor:
        cursor.execute(
            "UPDATE queen.messages m SET created_at = m.created_at - interval '2 hours'"
            "  FROM queen.partitions p JOIN queen.queues q ON q.id = p.queue_id"
            " WHERE m.partition_id = p.id AND q.name = %s", (queue,))
        assert cursor.rowcount == 3

    dashboard = open_dashboard(dash_server.url)
    dashboard.open(f"#/queues/{queue}")
    dashboard.wait_for('tr[data-message="old-0"]')

    listed = dashboard.page.eval_on_selector_all(
        "tr[data-message]", "rows => rows.map(row => row.dataset.message)")
    assert listed == ["old-2", "old-1", "old-0"]
    dashboard.finish()


def test_show_all_lists_every_queue_past_the_first_200(
        api: httpx.Client, dash_server: ServerProcess,
        open_dashboard: Callable[[str], Dashboard]) -> None:
    """The overview showed 200 queues and said "200 of N shown", with no way to the rest."""
    tag = uuid.uuid4().hex[:6]
    names = [f"zzz-many-{tag}-{n:03d}" for n in range(250)]
    answer = api.post("/api/v1/push", json={"items": [
        {"queue": name, "payload": {"n": n}} for n, name in enumerate(names)]}, timeout=120)
    assert answer.status_code == 201, answer.text
    dashboard = open_dashboard(dash_server.url)
    dashboard.open("#/")
    dashboard.wait_for("tr[data-queue]")

    dashboard.wait_for("button.show-all").click()
    dashboard.wait_for(f'tr[data-queue="{names[-1]}"]')

    shown = set(dashboard.page.eval_on_selector_all(
        "tr[data-queue]", "rows => rows.map(row => row.dataset.queue)"))
    assert set(names) <= shown
    assert dashboard.page.locator("button.show-all").count() == 0
    dashboard.finish()


def test_a_dead_timer_whose_partition_is_gone_offers_no_retry(
        api: httpx.Client, dash_server: ServerProcess, db: Any,
        open_dashboard: Callable[[str], Dashboard]) -> None:
    """Its partitionId is null: Retry called /api/v1/messages/null/… and got a 400 banner."""
    from tests.test_timers import batch, schedule_op
    from tests.test_timers_dlq import kill_timer
    queue = unique_name("test-dash-orphan-")
    batch(api, schedule_op(queue, "orphan", {"lost": True}, 60_000, txn="orph-1"))
    kill_timer(db, queue, "orphan")
    dashboard = open_dashboard(dash_server.url)
    dashboard.open("#/dlq")

    shown = dashboard.wait_for('tr[data-dlq-message="orph-1"]')

    assert shown.locator("button[data-retry]").count() == 0
    assert "partition gone" in shown.inner_text()
    dashboard.finish()


def test_dead_letters_past_the_first_page_are_reached_with_the_pager(
        api: httpx.Client, dash_server: ServerProcess,
        open_dashboard: Callable[[str], Dashboard]) -> None:
    """The page asks the API for 100 letters at a time; with 130 the 30 oldest were out of
    reach (no pager, no Show all)."""
    queue = unique_name("test-dash-")
    configure(api, queue)
    pushed = push(api, queue, [{"n": n} for n in range(130)], prefix="m")
    for n in range(130):
        assert api.post(f"/api/v1/messages/{pushed[n]['partition_id']}/m{n}/dlq",
                        json={}).status_code == 200
    dashboard = open_dashboard(dash_server.url)
    dashboard.open(f"#/dlq/{queue}")
    dashboard.wait_for("tr[data-dlq-message]")
    first_page = dashboard.page.locator("tr[data-dlq-message]").count()
    first_pager = dashboard.page.inner_text("[data-pager]")

    dashboard.page.click("button.page-after")
    dashboard.page.wait_for_function(
        "() => document.querySelectorAll('tr[data-dlq-message]').length === 30",
        timeout=UI_WAIT_MS)
    second = {row.get_attribute("data-dlq-message")
              for row in dashboard.page.locator("tr[data-dlq-message]").all()}

    assert first_page == 100 and first_pager.startswith("1–100 of 130")
    assert dashboard.page.inner_text("[data-pager]").startswith("101–130 of 130")
    assert len(second) == 30 and second <= {f"m{n}" for n in range(130)}
    assert dashboard.page.locator("button.page-before").count() == 1
    dashboard.finish()


def test_the_overview_counts_the_dead_letters_the_dead_letter_page_lists(
        api: httpx.Client, dash_server: ServerProcess, db: Any,
        open_dashboard: Callable[[str], Dashboard]) -> None:
    """A dead timer is a dead letter on the Dead letters page; the overview's card counted
    the messages' dead letters only (the status route's figure)."""
    from tests.test_timers import batch, schedule_op
    from tests.test_timers_dlq import kill_timer

    queue = unique_name("test-dash-")
    configure(api, queue)
    batch(api, schedule_op(queue, "tk", {"t": 1}, 60_000, txn=f"{queue}-t"))
    kill_timer(db, queue, "tk")
    listed = api.get("/api/v1/dlq", params={"limit": 1}).json()["total"]
    dashboard = open_dashboard(dash_server.url)

    dashboard.open("#/")
    shown = shown_number(dashboard.wait_for('[data-testid="dlq-size"]').inner_text())

    assert listed >= 1 and shown == listed
    dashboard.finish()


@pytest.mark.parametrize("typed", ["tök€n", "Bearer abc"])
def test_a_token_no_header_can_carry_is_refused_at_the_form(
        jwt_server: ServerProcess, open_dashboard: Callable[[str], Dashboard],
        typed: str) -> None:
    """fetch() refuses a header value beyond printable ASCII before sending it, and every
    call then read as 'the server cannot be reached'; such a token is refused as typed."""
    dashboard = open_dashboard(jwt_server.url)
    dashboard.failed_loads_expected = True  # the calls made without a token
    dashboard.open("#/groups")

    dashboard.page.fill("#token", typed)
    dashboard.page.click("#token-form button[type=submit]")

    assert "not a token" in dashboard.page.inner_text("#token-state")
    assert dashboard.page.evaluate("sessionStorage.getItem('queen-tw.token')") is None
    dashboard.finish()


def test_trace_names_past_the_first_page_are_reached_with_the_pager(
        api: httpx.Client, dash_server: ServerProcess,
        open_dashboard: Callable[[str], Dashboard]) -> None:
    queue = unique_name("test-dash-")
    tag = uuid.uuid4().hex[:6]
    pushed = push(api, queue, [{"n": 1}], prefix=f"tn{tag}-")[0]
    traced = api.post("/api/v1/traces", json={
        "transactionId": f"tn{tag}-0", "partitionId": pushed["partition_id"],
        "traceNames": [f"name-{tag}-{n:03d}" for n in range(105)], "data": {}})
    assert traced.status_code == 201, traced.text
    total = api.get("/api/v1/traces/names").json()["total"]
    dashboard = open_dashboard(dash_server.url)
    dashboard.open("#/traces")
    dashboard.wait_for("tr[data-trace-name]")
    first = dashboard.page.locator("tr[data-trace-name]").count()

    dashboard.page.click("button.page-after")
    second_page = min(total - 100, 100)
    dashboard.page.wait_for_function(
        f"() => document.querySelectorAll('tr[data-trace-name]').length === {second_page}",
        timeout=UI_WAIT_MS)

    assert total >= 105 and first == 100
    assert dashboard.page.inner_text("[data-pager]").startswith(
        f"101–{min(total, 200)} of {total}")
    dashboard.finish()
