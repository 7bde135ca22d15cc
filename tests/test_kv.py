"""KV state (WIRE2.md 2): POST /api/v1/kv with every op, its path sugar, and the 2.6.0
client's ``client.kv`` against a real server and PostgreSQL.

Expiry is exercised by moving a row's ``expires_at`` into the past in the database (what a
TTL running out does), so no test sleeps for a TTL.
"""

import threading
from typing import Any, Dict, List

import httpx
import pytest
from client26 import run26

from faultkit import Fleet, health_code, private_postgres
from support import unique_name, wait_until


def kv(http: httpx.Client, *ops: Dict[str, Any]) -> Dict[str, Any]:
    answer = http.post("/api/v1/kv", json={"operations": list(ops)})
    assert answer.status_code == 200, answer.text
    return answer.json()


def results(http: httpx.Client, *ops: Dict[str, Any]) -> List[Dict[str, Any]]:
    body = kv(http, *ops)
    assert "results" in body, body
    return body["results"]


def refused(http: httpx.Client, body: Any) -> httpx.Response:
    answer = http.post("/api/v1/kv", json=body)
    assert answer.status_code in (400, 413), answer.text
    return answer


def expire(db, ns: str, key: str) -> None:
    """The row's TTL has run out (it stays in the table until a sweep)."""
    with db.cursor() as cursor:
        cursor.execute("UPDATE queen.kv SET expires_at = now() - interval '1 second' "
                       "WHERE namespace = %s AND key = %s", (ns, key))
        assert cursor.rowcount == 1
    db.commit()


def ns_name() -> str:
    return unique_name("ns-").lower()


# -- reads and writes ---------------------------------------------------------------------

def test_put_then_get_answers_value_version_and_expiry(http):
    ns = ns_name()
    [put] = results(http, {"op": "put", "ns": ns, "key": "a/b", "value": {"n": 1},
                           "ttlSeconds": 60})
    assert put["applied"] is True and put["index"] == 0 and put["op"] == "put"
    assert put["value"] == {"n": 1} and put["version"] > 0
    [got] = results(http, {"op": "get", "ns": ns, "key": "a/b"})
    assert got["found"] is True and got["value"] == {"n": 1}
    assert got["version"] == put["version"]
    assert got["expiresAt"].endswith("Z") and len(got["expiresAt"].split(".")[1]) == 7
    [miss] = results(http, {"op": "get", "ns": ns, "key": "nope"})
    assert miss == {"index": 0, "op": "get", "found": False, "key": "nope"}


def test_null_is_a_value_and_forever_has_no_expiry(http):
    ns = ns_name()
    results(http, {"op": "put", "ns": ns, "key": "k", "value": None, "forever": True})
    [got] = results(http, {"op": "get", "ns": ns, "key": "k"})
    assert got["found"] is True and got["value"] is None and got["expiresAt"] is None


def test_versions_rise_on_every_write_and_put_replaces_the_expiry(http, db):
    ns = ns_name()
    first = results(http, {"op": "put", "ns": ns, "key": "k", "value": 1, "ttlSeconds": 5})[0]
    second = results(http, {"op": "put", "ns": ns, "key": "k", "value": 2, "forever": True})[0]
    assert second["version"] > first["version"]
    [got] = results(http, {"op": "get", "ns": ns, "key": "k"})
    assert got["expiresAt"] is None  # never inherits the old TTL


def test_expired_row_is_absent_everywhere_at_once(http, db):
    ns = ns_name()
    results(http, {"op": "put", "ns": ns, "key": "k", "value": "v", "ttlSeconds": 60},
            {"op": "put", "ns": ns, "key": "k2", "value": "w", "ttlSeconds": 60})
    expire(db, ns, "k")
    got, many, listed, deleted, checked, expect_live = results(
        http, {"op": "get", "ns": ns, "key": "k"},
        {"op": "getMany", "ns": ns, "keys": ["k", "k2"]},
        {"op": "getPrefix", "ns": ns, "prefix": "k"},
        {"op": "delete", "ns": ns, "key": "k"},
        {"op": "check", "ns": ns, "key": "k", "expect": 0},
        {"op": "check", "ns": ns, "key": "k2", "expect": 0})
    assert got["found"] is False
    assert [row["key"] for row in many["rows"]] == ["k2"] and many["missing"] == ["k"]
    assert [row["key"] for row in listed["rows"]] == ["k2"]
    assert deleted["applied"] is False and deleted["reason"] == "absent"
    assert deleted["version"] == 0 and deleted["value"] is None
    assert checked["applied"] is True and checked["version"] == 0
    assert expect_live["applied"] is False and expect_live["reason"] == "exists"


def test_expect_zero_wins_over_an_expired_row_and_loses_to_a_live_one(http, db):
    ns = ns_name()
    first = results(http, {"op": "putIfAbsent", "ns": ns, "key": "k", "value": 1,
                           "ttlSeconds": 60})[0]
    again = results(http, {"op": "putIfAbsent", "ns": ns, "key": "k", "value": 2,
                           "ttlSeconds": 60})[0]
    assert first["applied"] is True and first["op"] == "putIfAbsent"
    assert again == {"index": 0, "op": "putIfAbsent", "applied": False, "reason": "exists",
                     "key": "k", "value": 1, "version": first["version"]}
    expire(db, ns, "k")
    won = results(http, {"op": "put", "ns": ns, "key": "k", "value": 3, "ttlSeconds": 60,
                         "expect": 0})[0]
    assert won["applied"] is True and won["version"] > first["version"]


def test_expect_version_updates_only_that_version_and_never_creates(http):
    ns = ns_name()
    created = results(http, {"op": "put", "ns": ns, "key": "k", "value": 1, "forever": True})[0]
    stale, absent = results(
        http, {"op": "put", "ns": ns, "key": "k", "value": 2, "forever": True,
               "expect": created["version"] + 1000},
        {"op": "put", "ns": ns, "key": "other", "value": 2, "forever": True, "expect": 5})
    assert stale["applied"] is False and stale["reason"] == "version"
    assert stale["value"] == 1 and stale["version"] == created["version"]
    assert absent["applied"] is False and absent["reason"] == "absent" and absent["version"] == 0
    [ok] = results(http, {"op": "put", "ns": ns, "key": "k", "value": 2, "forever": True,
                          "expect": created["version"]})
    assert ok["applied"] is True
    [gone] = results(http, {"op": "get", "ns": ns, "key": "other"})
    assert gone["found"] is False


def test_delete_answers_the_removed_row_and_expect_zero_on_absent_applies(http):
    ns = ns_name()
    created = results(http, {"op": "put", "ns": ns, "key": "k", "value": "x", "forever": True})[0]
    deleted, must_not_exist = results(http, {"op": "delete", "ns": ns, "key": "k"},
                                      {"op": "delete", "ns": ns, "key": "z", "expect": 0})
    assert deleted == {"index": 0, "op": "delete", "applied": True, "key": "k", "value": "x",
                       "version": created["version"]}
    assert must_not_exist["applied"] is True and must_not_exist["version"] == 0
    assert must_not_exist["value"] is None


def test_check_reports_version_absent_and_exists(http):
    ns = ns_name()
    v = results(http, {"op": "put", "ns": ns, "key": "k", "value": 7, "forever": True})[0]
    held, wrong, absent = results(
        http, {"op": "check", "ns": ns, "key": "k", "expect": v["version"]},
        {"op": "check", "ns": ns, "key": "k", "expect": v["version"] + 1},
        {"op": "check", "ns": ns, "key": "q", "expect": 3})
    assert held["applied"] is True and held["value"] == 7
    assert wrong["reason"] == "version" and absent["reason"] == "absent"


# -- incr -------------------------------------------------------------------------------

def test_incr_creates_counts_and_keeps_its_first_expiry(http):
    ns = ns_name()
    one = results(http, {"op": "incr", "ns": ns, "key": "c", "ttlSeconds": 60})[0]
    assert one["applied"] is True and one["value"] == 1
    two = results(http, {"op": "incr", "ns": ns, "key": "c", "delta": 2.5, "forever": True})[0]
    assert two["value"] == 3.5 and two["version"] > one["version"]
    [got] = results(http, {"op": "get", "ns": ns, "key": "c"})
    assert got["expiresAt"] is not None  # the TTL is create-only
    back = results(http, {"op": "incr", "ns": ns, "key": "c", "delta": -0.5, "forever": True})[0]
    assert back["value"] == 3  # shortest form: 3, not 3.0


def test_incr_with_a_null_delta_counts_by_the_default_one(http):
    """delta is "number, default 1" (WIRE2 2.1): null is the default, as is absent. It
    reached SQL as NULL, made the new value NULL and answered 500."""
    ns = ns_name()
    [first] = results(http, {"op": "incr", "ns": ns, "key": "c", "delta": None,
                             "min": None, "forever": True})
    [second] = results(http, {"op": "incr", "ns": ns, "key": "c", "delta": None,
                              "forever": True})
    assert first["value"] == 1 and second["value"] == 2


def test_incr_is_exact_decimal_arithmetic(http):
    ns = ns_name()
    results(http, {"op": "incr", "ns": ns, "key": "c", "delta": 0.1, "forever": True})
    [sum_] = results(http, {"op": "incr", "ns": ns, "key": "c", "delta": 0.2, "forever": True})
    assert sum_["value"] == 0.3  # not 0.30000000000000004
    [big] = results(http, {"op": "incr", "ns": ns, "key": "b", "delta": 2**62, "forever": True})
    [bigger] = results(http, {"op": "incr", "ns": ns, "key": "b", "delta": 2**62,
                              "forever": True})
    assert big["value"] == 2**62 and bigger["value"] == 2**63  # beyond bigint, still exact


def test_incr_over_a_bound_refuses_without_spending(http):
    ns = ns_name()
    for _ in range(3):
        assert results(http, {"op": "incr", "ns": ns, "key": "c", "max": 3,
                              "ttlSeconds": 60})[0]["applied"]
    over = results(http, {"op": "incr", "ns": ns, "key": "c", "max": 3, "ttlSeconds": 60})[0]
    assert over["applied"] is False and over["reason"] == "limit" and over["value"] == 3
    [got] = results(http, {"op": "get", "ns": ns, "key": "c"})
    assert got["value"] == 3 and got["version"] == over["version"]
    big = results(http, {"op": "incr", "ns": ns, "key": "fresh", "delta": 10, "max": 5,
                         "ttlSeconds": 60})[0]
    assert big["applied"] is False and big["reason"] == "limit" and big["value"] == 0
    assert results(http, {"op": "get", "ns": ns, "key": "fresh"})[0]["found"] is False
    under = results(http, {"op": "incr", "ns": ns, "key": "c", "delta": -4, "min": 0,
                           "ttlSeconds": 60})[0]
    assert under["applied"] is False and under["reason"] == "limit"


def test_incr_past_1e308_is_refused_with_limit_and_the_key_stays_readable(http):
    """A result the server could not read back (an integer past 4300 digits, a decimal past
    float range) used to be stored and answered 500; every later read of the key too."""
    ns = ns_name()
    huge = int("9" * 4300)
    [stored] = results(http, {"op": "put", "ns": ns, "key": "big", "value": huge,
                              "forever": True})
    [over] = results(http, {"op": "incr", "ns": ns, "key": "big", "delta": 1, "forever": True})
    assert over["applied"] is False and over["reason"] == "limit", over
    assert over["value"] == huge and over["version"] == stored["version"]
    results(http, {"op": "put", "ns": ns, "key": "dec", "value": 10**307 * 9,
                   "forever": True})
    [beyond] = results(http, {"op": "incr", "ns": ns, "key": "dec", "delta": 10**307 + 0.5,
                              "forever": True})
    assert beyond["applied"] is False and beyond["reason"] == "limit", beyond
    [got] = results(http, {"op": "get", "ns": ns, "key": "big"})
    assert got["value"] == huge and got["version"] == stored["version"]


def test_incr_on_a_non_number_is_refused_with_type(http):
    ns = ns_name()
    results(http, {"op": "put", "ns": ns, "key": "s", "value": "text", "forever": True})
    [refusal] = results(http, {"op": "incr", "ns": ns, "key": "s", "forever": True})
    assert refusal["applied"] is False and refusal["reason"] == "type" and refusal["value"] == 0


def test_once_under_twenty_concurrent_callers_has_exactly_one_winner(server):
    ns = ns_name()
    outcomes: List[bool] = []
    start = threading.Barrier(20)

    def claim() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            start.wait()
            body = client.post("/api/v1/kv", json={"operations": [
                {"op": "putIfAbsent", "ns": ns, "key": "job-1", "value": True,
                 "ttlSeconds": 60}]}).json()
            outcomes.append(body["results"][0]["applied"])

    threads = [threading.Thread(target=claim) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == [False] * 19 + [True]


# -- listings --------------------------------------------------------------------------

def test_get_prefix_pages_by_cursor_in_byte_order(http):
    ns = ns_name()
    keys = ["p/b", "p/a", "p/B", "p/é", "p/c", "q/a", "p"]
    results(http, *({"op": "put", "ns": ns, "key": k, "value": k, "forever": True}
                    for k in keys))
    first = results(http, {"op": "getPrefix", "ns": ns, "prefix": "p/", "limit": 2})[0]
    assert [r["key"] for r in first["rows"]] == ["p/B", "p/a"]
    assert first["truncated"] is True and first["nextAfter"] == "p/a"
    rest = results(http, {"op": "getPrefix", "ns": ns, "prefix": "p/", "after": "p/a",
                          "keysOnly": True})[0]
    assert [r["key"] for r in rest["rows"]] == ["p/b", "p/c", "p/é"]
    assert "value" not in rest["rows"][0]
    assert rest["truncated"] is False and rest["nextAfter"] is None
    clamped = results(http, {"op": "getPrefix", "ns": ns, "prefix": "p/", "limit": 0})[0]
    assert len(clamped["rows"]) == 1 and clamped["truncated"] is True


def test_read_budget_truncates_after_the_straddling_row(http):
    ns = ns_name()
    big = "x" * 60_000  # 70 such values exceed the 4 MiB read budget of a call
    for start in range(0, 80, 40):
        results(http, *({"op": "put", "ns": ns, "key": f"k{n:03d}", "value": big,
                         "forever": True} for n in range(start, start + 40)))
    page = results(http, {"op": "getPrefix", "ns": ns, "prefix": "k", "limit": 1000})[0]
    assert page["truncated"] is True
    count = len(page["rows"])
    assert count == -(-4 * 1024 * 1024 // (60_000 + 2))  # the row crossing the line included
    assert page["nextAfter"] == page["rows"][-1]["key"]
    many = results(http, {"op": "getMany", "ns": ns,
                          "keys": [f"k{n:03d}" for n in range(80)] + ["zz"]})[0]
    assert many["truncated"] is True and len(many["rows"]) == count
    assert many["missing"] == ["zz"]


def test_a_page_the_budget_left_empty_goes_on_from_its_after(http):
    """Earlier ops of the call spent the read budget: getPrefix answers no rows, truncated.
    Its nextAfter was null, so a reader following it started over from the beginning."""
    ns = ns_name()
    big = "x" * 60_000
    for start in range(0, 80, 40):
        results(http, *({"op": "put", "ns": ns, "key": f"k{n:03d}", "value": big,
                         "forever": True} for n in range(start, start + 40)))
    results(http, {"op": "put", "ns": ns, "key": "p1", "value": 1, "forever": True})
    *_, page = results(http, {"op": "getPrefix", "ns": ns, "prefix": "k", "limit": 1000},
                       {"op": "getPrefix", "ns": ns, "prefix": "p", "after": "p0"})
    assert page["rows"] == [] and page["truncated"] is True
    assert page["nextAfter"] == "p0"


def test_multi_key_reads_see_the_calls_own_writes(http):
    ns = ns_name()
    listed, _put = results(http, {"op": "getPrefix", "ns": ns, "prefix": "a"},
                           {"op": "put", "ns": ns, "key": "a1", "value": 1, "forever": True})
    assert [r["key"] for r in listed["rows"]] == ["a1"]


# -- required and atomicity ---------------------------------------------------------------

def test_required_loss_rolls_back_the_whole_call(http):
    ns = ns_name()
    results(http, {"op": "put", "ns": ns, "key": "taken", "value": 1, "forever": True})
    body = kv(http, {"op": "put", "ns": ns, "key": "w", "value": 1, "forever": True},
              {"op": "putIfAbsent", "ns": ns, "key": "taken", "value": 2, "forever": True,
               "required": True})
    assert body["ok"] is False and body["reason"] == "kv_precondition"
    assert body["failedIndex"] == 1 and body["kvReason"] == "exists" and body["value"] == 1
    assert "results" not in body
    assert results(http, {"op": "get", "ns": ns, "key": "w"})[0]["found"] is False


# -- refusals -----------------------------------------------------------------------------

@pytest.mark.parametrize(("op", "reason"), [
    ({"op": "put", "ns": "n", "key": "k", "value": 1}, "kv_expiry_not_specified"),
    ({"op": "put", "ns": "n", "key": "k", "value": 1, "ttlSeconds": 5, "forever": True},
     "kv_expiry_not_specified"),
    ({"op": "put", "ns": "N", "key": "k", "value": 1, "forever": True}, "kv_bad_namespace"),
    ({"op": "put", "ns": "n", "key": "", "value": 1, "forever": True}, "kv_bad_key"),
    ({"op": "put", "ns": "n", "key": "k", "value": 1, "forever": True, "expect": -1},
     "kv_bad_expect"),
    ({"op": "putIfAbsent", "ns": "n", "key": "k", "value": 1, "forever": True, "expect": 3},
     "kv_bad_expect"),
    ({"op": "incr", "ns": "n", "key": "k", "forever": True, "expect": 1}, "kv_bad_expect"),
    ({"op": "check", "ns": "n", "key": "k"}, "kv_bad_expect"),
    ({"op": "incr", "ns": "n", "key": "k", "forever": True, "delta": True}, "kv_bad_number"),
    ({"op": "get", "ns": "n", "key": "k", "tenant": "t"}, "kv_tenant_field"),
    ({"op": "getPrefix", "ns": "n", "prefix": ""}, "kv_bad_key"),
    ({"op": "frob", "ns": "n", "key": "k"}, "kv_unknown_op"),
])
def test_bad_ops_answer_the_envelope_and_apply_nothing(http, op, reason):
    ns = ns_name()
    ok_write = {"op": "put", "ns": ns, "key": "first", "value": 1, "forever": True}
    answer = refused(http, {"operations": [ok_write, op]})
    body = answer.json()
    assert answer.status_code == 400
    assert body["error"] == "kv_bad_request" and body["reason"] == reason and body["detail"]
    assert results(http, {"op": "get", "ns": ns, "key": "first"})[0]["found"] is False


def test_limits_answer_413_and_400(http):
    key = refused(http, [{"op": "get", "ns": "n", "key": "k" * 513}])
    assert key.status_code == 413 and key.json()["reason"] == "kv_key_too_large"
    value = refused(http, [{"op": "put", "ns": "n", "key": "k", "value": "v" * 65_536,
                            "forever": True}])
    assert value.status_code == 413 and value.json()["reason"] == "kv_value_too_large"
    many = refused(http, [{"op": "get", "ns": "n", "key": f"k{n}"} for n in range(257)])
    assert many.json()["reason"] == "kv_too_many_ops"
    dup = refused(http, [{"op": "put", "ns": "n", "key": "k", "value": 1, "forever": True},
                         {"op": "delete", "ns": "n", "key": "k"}])
    assert dup.json()["reason"] == "kv_duplicate_key_in_call"
    keys = refused(http, [{"op": "getMany", "ns": "n", "keys": [f"k{n}" for n in range(1000)]}
                          for _ in range(5)])
    assert keys.json()["reason"] == "kv_too_many_keys"
    bad_json = http.post("/api/v1/kv", content=b"{nope",
                         headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"] == "kv_bad_request"


def test_reads_may_repeat_a_key_and_an_empty_batch_answers_nothing(http):
    ns = ns_name()
    assert len(results(http, {"op": "get", "ns": ns, "key": "k"},
                       {"op": "get", "ns": ns, "key": "k"})) == 2
    assert kv(http) == {"results": []}


# -- path sugar (WIRE2.md 2.4) -----------------------------------------------------------

def test_path_routes_put_get_delete_with_slashes_in_the_key(http):
    ns = ns_name()
    put = http.put(f"/api/v1/kv/{ns}/a/b/c", json={"value": [1], "ttlSeconds": 30})
    assert put.status_code == 200 and put.json()["applied"] is True
    got = http.get(f"/api/v1/kv/{ns}/a/b/c")
    assert got.json()["value"] == [1] and got.headers["ETag"] == f'"{put.json()["version"]}"'
    stale = http.request("DELETE", f"/api/v1/kv/{ns}/a/b/c", json={"expect": 1})
    assert stale.json()["applied"] is False and stale.json()["reason"] == "version"
    gone = http.delete(f"/api/v1/kv/{ns}/a/b/c")
    assert gone.json()["applied"] is True
    assert http.get(f"/api/v1/kv/{ns}/a/b/c").json()["found"] is False
    assert http.get(f"/api/v1/kv/{ns}/k?x=1").json()["reason"] == "kv_query_string_not_allowed"
    in_body = http.put(f"/api/v1/kv/{ns}/k", json={"value": 1, "forever": True, "key": "x"})
    assert in_body.status_code == 400 and in_body.json()["reason"] == "kv_path_field_in_body"

def test_path_routes_decode_an_encoded_slash_in_the_key_once(http):
    ns = ns_name()
    put = http.put(f"/api/v1/kv/{ns}/a%2Fb/c", json={"value": "slashed", "forever": True})
    assert put.status_code == 200 and put.json()["applied"] is True
    # the same key as the one written with plain separators, and as the POST route names it
    assert http.get(f"/api/v1/kv/{ns}/a/b/c").json()["value"] == "slashed"
    assert results(http, {"op": "get", "ns": ns, "key": "a/b/c"})[0]["value"] == "slashed"
    in_ns = http.get(f"/api/v1/kv/{ns}%2Fx/a")
    assert in_ns.status_code == 400 and "must not contain '/'" in in_ns.json()["error"]


def test_path_routes_reach_keys_with_control_characters(http):
    ns = ns_name()
    put = http.put(f"/api/v1/kv/{ns}/line%0Abreak%09tab", json={"value": 1, "forever": True})
    assert put.status_code == 200 and put.json()["applied"] is True
    assert results(http, {"op": "get", "ns": ns, "key": "line\nbreak\ttab"})[0]["value"] == 1
    assert http.delete(f"/api/v1/kv/{ns}/line%0Abreak%09tab").json()["applied"] is True

# -- the 2.6.0 client -----------------------------------------------------------------

CLIENT_KV = """
from datetime import timedelta

async def scenario(client, args):
    ns = args["ns"]
    out = {}
    put = await client.kv.put(ns, "cfg", {"a": 1}, ttl=timedelta(seconds=30))
    out["put"] = bool(put)
    out["get"] = (await client.kv.get(ns, "cfg"))["value"]
    out["once"] = [await client.kv.once(ns, "job", ttl_seconds=60) for _ in range(2)]
    out["incr"] = [bool(await client.kv.incr(ns, "rate", max=2, ttl_seconds=60))
                   for _ in range(3)]
    stale = await client.kv.put(ns, "cfg", 2, forever=True, expect=put["version"] + 99)
    out["stale"] = [bool(stale), stale["reason"]]
    out["deleted"] = bool(await client.kv.delete(ns, "cfg"))
    out["absent"] = bool(await client.kv.delete(ns, "cfg"))
    for n in range(5):
        await client.kv.put(ns, f"list/{n}", n, forever=True)
    out["listed"] = [r["key"] for r in await client.kv.list_all(ns, "list/", limit=2)]
    many = await client.kv.get_many(ns, ["list/1", "nope"])
    out["many"] = [[r["key"] for r in many["rows"]], many["missing"]]
    try:
        await client.kv.get("BAD NS", "k")
    except Exception as error:
        out["error"] = [type(error).__name__, error.code, error.reason]
    return out
"""


def test_the_2_6_client_kv_helpers(server):
    out = run26(server.url, CLIENT_KV, ns=ns_name())
    assert out == {
        "put": True, "get": {"a": 1}, "once": [True, False], "incr": [True, True, False],
        "stale": [False, "version"], "deleted": True, "absent": False,
        "listed": [f"list/{n}" for n in range(5)], "many": [["list/1"], ["nope"]],
        "error": ["KvError", "kv_bad_request", "kv_bad_namespace"]}


# -- the sweeper -----------------------------------------------------------------------------

def test_the_sweeper_deletes_expired_rows_and_keeps_live_ones(make_server, db):
    server = make_server(RETENTION_INTERVAL="300")
    ns = ns_name()
    with httpx.Client(base_url=server.url) as client:
        results(client, *({"op": "put", "ns": ns, "key": f"k{n}", "value": n, "ttlSeconds": 60}
                          for n in range(3)))
    expire(db, ns, "k0")
    expire(db, ns, "k1")

    def stored() -> List[str]:
        with db.cursor() as cursor:
            cursor.execute("SELECT key FROM queen.kv WHERE namespace = %s ORDER BY key", (ns,))
            keys = [row[0] for row in cursor.fetchall()]
        db.commit()
        return keys

    assert wait_until(lambda: stored() == ["k2"] or None, timeout=10)


# -- outage ------------------------------------------------------------------------------------

def test_kv_and_locks_answer_503_envelopes_with_retry_after_while_postgres_is_down():
    with private_postgres() as postgres:
        fleet = Fleet(postgres.pg_env())
        try:
            server = fleet.server()
            with httpx.Client(base_url=server.url, timeout=20) as client:
                assert results(client, {"op": "get", "ns": "n", "key": "k"})[0]["found"] is False
                postgres.stop()
                try:
                    wait_until(lambda: health_code(server.url) == 503, 10,
                               message="/health 503")
                    down = client.post("/api/v1/kv", json=[{"op": "get", "ns": "n",
                                                            "key": "k"}])
                    locks = client.post("/api/v1/locks", json=[{"op": "get", "name": "l"}])
                finally:
                    postgres.start()
        finally:
            fleet.close()
    assert down.status_code == 503 and down.headers["Retry-After"] == "1"
    assert down.json()["error"] == "kv_unavailable" and down.json()["detail"]
    assert locks.status_code == 503 and locks.json()["error"] == "locks_unavailable"


CLIENT_SUPERVISION = """
import base64, json

async def scenario(client, args):
    await client.queue(args["queue"]).push([{"data": {"n": 1}}])
    seen = []

    async def handler(message):
        seen.append(message["data"])

    await (client.queue(args["queue"]).supervision({"group": args["group"]})
           .limit(1).each().consume(handler))
    rows = await client.kv.list_all("queen-supervisor", args["group"] + "/")
    chunks = [r for r in rows if r["key"].endswith("/chunk/0000")]
    status = json.loads(base64.b64decode(chunks[0]["value"]["data"]))
    return {"seen": seen, "keys": sorted(r["key"].rsplit("/", 2)[-1] if r["key"].endswith("/head")
                                         else "chunk" for r in rows),
            "state": status["state"]}
"""


def test_the_2_6_client_consumer_supervision_publishes_its_status_in_kv(server):
    out = run26(server.url, CLIENT_SUPERVISION, queue=unique_name(), group="app-" + ns_name())
    assert out == {"seen": [{"n": 1}], "keys": ["chunk", "head"], "state": "stopped"}
