"""The ephemeral engine and its long polls without a server: a fake clock drives leases,
TTL and windows exactly (WIRE2.md 7)."""

from __future__ import annotations

import json

import pytest
from twisted.internet import defer, task

from queen_tw.ephemeral.engine import EphemeralEngine, parse_id
from queen_tw.ephemeral.errors import BadRequest, NoRoom, QueueFull, QueueNotFound
from queen_tw.ephemeral.options import Defaults, parse_options
from queen_tw.ephemeral.waiting import LongPolls

Q = "__QUEUE_MODE__"


def payloads(*values):
    return [json.dumps(value).encode() for value in values]


def seen(deliveries):
    return [json.loads(each.payload) for each in deliveries]


@pytest.fixture
def clock():
    return task.Clock()


@pytest.fixture
def engine(clock):
    return EphemeralEngine(clock, Defaults(max_bytes=10_000, queue_max_bytes=1000,
                                           queue_max_length=100, lease_seconds=30,
                                           retry_limit=2), epoch=7)


def test_competing_pops_of_one_group_share_the_messages_in_order(engine):
    engine.push("q", "p", payloads(1, 2, 3))
    first = engine.take("q", None, "g", 2, False)
    second = engine.take("q", None, "g", 2, False)
    assert seen(first) == [1, 2] and seen(second) == [3]
    assert [each.attempts for each in first + second] == [1, 1, 1]


def test_pops_without_partition_take_the_partitions_in_turn(engine):
    # A partition with a backlog, kept full, must not starve the ones after it.
    engine.declare("q", parse_options({"maxLength": 1000}))
    engine.push("q", "a", payloads(*range(50)))
    engine.push("q", "b", payloads("b"))
    engine.push("q", "c", payloads("c"))
    served = [engine.take("q", None, "g", 1, True)[0].partition for _ in range(5)]
    assert served == ["a", "b", "c", "a", "a"]
    engine.push("q", "b", payloads("b2"))
    assert [d.partition for d in engine.take("q", None, "g", 3, True)] == ["b", "a", "a"]
    assert seen(engine.take("q", "a", "g", 100, True)) == list(range(5, 50))  # order kept


def test_pops_naming_partitions_that_hold_nothing_keep_no_state(engine):
    engine.declare("q", parse_options({"maxLength": 10}))
    for n in range(100):
        assert engine.take("q", f"nobody-{n}", "g", 1, False) == []
    assert engine.queue("q").rings == {}
    engine.push("q", "nobody-7", payloads("late"))  # the group's cursor starts at the head
    assert seen(engine.take("q", "nobody-7", "g", 1, True)) == ["late"]


def test_distinct_groups_each_see_every_message(engine):
    engine.take("q", None, "a", 1, False)  # both groups known before the push
    engine.take("q", None, "b", 1, False)
    engine.push("q", "p", payloads(1, 2))
    assert seen(engine.take("q", None, "a", 10, True)) == [1, 2]
    assert seen(engine.take("q", None, "b", 10, True)) == [1, 2]
    assert engine.queue("q").length == 0  # both groups past them: forgotten


def test_expired_lease_redelivers_with_one_more_attempt_until_the_retry_limit(engine, clock):
    engine.push("q", "p", payloads("x"))
    attempts = []
    for _ in range(3):  # first delivery + retryLimit (2) redeliveries
        got = engine.take("q", "p", Q, 1, False)
        attempts.append(got[0].attempts)
        clock.advance(30)
    assert attempts == [1, 2, 3]
    assert engine.take("q", "p", Q, 1, False) == []
    assert engine.queue("q").drops["retry"] == 1
    assert engine.queue("q").length == 0


def test_one_timer_serves_every_lease(engine, clock):
    engine.push("q", "p", payloads(*range(50)))
    for _ in range(50):
        engine.take("q", "p", Q, 1, False)
        clock.advance(0.1)
    assert len(clock.getDelayedCalls()) == 1


def test_ack_outcomes(engine):
    engine.push("q", "p", payloads(1, 2, 3))
    one, two, three = engine.take("q", "p", Q, 3, False)
    stale = one.id.replace("e:7:", "e:8:")
    results = dict(engine.ack("q", Q, [(one.id, "completed"), (two.id, "failed"),
                                       (stale, "completed"), ("garbage", "completed"),
                                       (one.id, "completed")]))
    assert results[two.id] == "redelivered"
    assert results[stale] == "stale" and results["garbage"] == "unknown"
    assert engine.ack("q", Q, [(one.id, "completed")]) == [(one.id, "unknown")]
    assert engine.ack("q", "other-group", [(three.id, "completed")]) == [(three.id, "unknown")]
    again = engine.take("q", "p", Q, 5, False)
    assert seen(again) == [2] and again[0].attempts == 2


def test_failed_ack_past_the_retry_limit_is_acked_and_counted(engine):
    engine.push("q", "p", payloads("x"))
    for attempt in (1, 2, 3):
        (got,) = engine.take("q", "p", Q, 1, False)
        assert got.attempts == attempt
        outcome = engine.ack("q", Q, [(got.id, "retry")])[0][1]
    assert outcome == "acked"
    assert engine.queue("q").drops["retry"] == 1


def test_reject_policy_refuses_the_whole_push(engine):
    engine.declare("q", parse_options({"maxLength": 3}))
    engine.push("q", "p", payloads(1, 2))
    with pytest.raises(QueueFull):
        engine.push("q", "p", payloads(3, 4))
    assert seen(engine.take("q", "p", Q, 10, True)) == [1, 2]


def test_drop_oldest_keeps_the_newest_and_counts_skips(engine):
    engine.declare("q", parse_options({"maxLength": 3, "policy": "dropOldest"}))
    engine.take("q", "p", "slow", 1, False)
    engine.push("q", "p", payloads(1, 2, 3))
    engine.push("q", "p", payloads(4, 5))
    assert engine.queue("q").drops["bounds"] == 2
    assert seen(engine.take("q", "p", "slow", 10, True)) == [3, 4, 5]
    assert engine.depth("q", None)["groups"] == [{"group": "slow", "pending": 0,
                                                  "skipped": 2}]


def test_drop_oldest_makes_room_in_other_partitions_once_its_own_is_empty(engine, clock):
    # A feed per room: one room filling the queue must not lock the other rooms out.
    engine.declare("q", parse_options({"maxLength": 4, "policy": "dropOldest"}))
    engine.push("q", "a", payloads("a1", "a2"))
    clock.advance(1)
    engine.push("q", "c", payloads("c1"))
    clock.advance(1)
    engine.push("q", "a", payloads("a3"))
    engine.push("q", "b", payloads("b1", "b2"))  # 6 > 4: b has nothing to drop yet
    assert engine.queue("q").drops["bounds"] == 2
    assert seen(engine.take("q", None, "g", 10, True)) == ["a3", "b1", "b2", "c1"]


def test_drop_oldest_refuses_a_push_larger_than_the_queue(engine):
    engine.declare("q", parse_options({"maxLength": 2, "policy": "dropOldest"}))
    engine.push("q", "a", payloads(1))
    with pytest.raises(QueueFull):
        engine.push("q", "b", payloads(1, 2, 3))
    assert seen(engine.take("q", None, "g", 10, True)) == [1]


def test_broker_budget_refuses_with_nothing_changed(engine):
    engine.push("a", "p", [b"x" * 900])
    engine.push("b", "p", [b"x" * 900])
    with pytest.raises(NoRoom):
        for name in "cdefghijklmn":
            engine.push(name, "p", [b"x" * 900])
    assert engine.bytes <= 10_000
    before = engine.bytes
    with pytest.raises(NoRoom):
        engine.push("z", "p", [b"x" * 900])
    assert engine.bytes == before


def test_ttl_drops_old_messages(engine, clock):
    engine.declare("q", parse_options({"ttlSeconds": 5}))
    engine.push("q", "p", payloads(1))
    clock.advance(3)
    engine.push("q", "p", payloads(2))
    clock.advance(3)
    assert engine.sweep_ttl() == 1
    assert seen(engine.take("q", "p", Q, 10, True)) == [2]
    assert engine.queue("q").drops["ttl"] == 1


def test_reset_and_remove(engine):
    engine.push("q", "p", payloads(1, 2))
    (got,) = engine.take("q", "p", Q, 1, False)
    assert engine.reset("q") == 2
    assert engine.ack("q", Q, [(got.id, "completed")]) == [(got.id, "unknown")]
    assert engine.take("q", "p", Q, 10, False) == []
    assert engine.remove("q") and not engine.remove("q")
    with pytest.raises(QueueNotFound):
        engine.depth("q", None)


def test_ids_carry_epoch_partition_and_sequence(engine):
    engine.push("q", "a:b", payloads(1))
    (got,) = engine.take("q", None, Q, 1, True)
    assert parse_id(got.id)[:2] == (7, "a:b")


@pytest.mark.parametrize("options, message", [
    ({"nope": 1}, "unknown option"),
    ({"maxBytes": -1}, "non-negative"),
    ({"ttlSeconds": 1.5}, "non-negative"),
    ({"retryLimit": True}, "non-negative"),
    ({"policy": "drop"}, "policy"),
    ({"windowBuffer": {"ms": 1, "size": 2}}, "windowBuffer"),
    ({"leaseSeconds": 86401}, "at most"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(BadRequest, match=message):
        parse_options(options)


# -- long polls ------------------------------------------------------------------------


def test_parked_pop_is_answered_by_a_push(engine, clock):
    polls = LongPolls(engine)
    answer = polls.pop("q", None, Q, 5, False, True, 10_000)
    assert not answer.called
    engine.push("q", "p", payloads(1))
    assert seen(answer.result) == [1]


def test_parked_pop_times_out_with_nothing(engine, clock):
    polls = LongPolls(engine)
    answer = polls.pop("q", None, Q, 5, False, True, 2000)
    clock.advance(2)
    assert answer.result == []


def test_failed_ack_wakes_a_parked_pop(engine, clock):
    polls = LongPolls(engine)
    engine.push("q", "p", payloads(1))
    (got,) = engine.take("q", None, Q, 1, False)
    answer = polls.pop("q", None, Q, 1, False, True, 10_000)
    engine.ack("q", Q, [(got.id, "failed")])
    assert answer.result[0].attempts == 2


def test_window_collects_until_count(engine, clock):
    engine.declare("q", parse_options({"windowBuffer": {"ms": 5000, "count": 3}}))
    polls = LongPolls(engine)
    answer = polls.pop("q", None, Q, 10, True, True, 30_000)
    engine.push("q", "p", payloads(1))
    engine.push("q", "p", payloads(2))
    assert not answer.called
    engine.push("q", "p", payloads(3))
    assert seen(answer.result) == [1, 2, 3]


def test_window_answers_after_its_ms(engine, clock):
    engine.declare("q", parse_options({"windowBuffer": {"ms": 500}}))
    polls = LongPolls(engine)
    answer = polls.pop("q", None, Q, 10, True, True, 30_000)
    engine.push("q", "p", payloads(1))
    clock.advance(0.4)
    engine.push("q", "p", payloads(2))
    assert not answer.called
    clock.advance(0.1)
    assert seen(answer.result) == [1, 2]


def test_a_reset_while_a_window_holds_leased_messages_takes_them_out(engine, clock):
    engine.declare("q", parse_options({"windowBuffer": {"ms": 500}}))
    polls = LongPolls(engine)
    answer = polls.pop("q", None, Q, 10, False, True, 30_000)
    engine.push("q", "p", payloads(1))
    engine.reset("q")  # the held message is gone, its lease void
    engine.push("q", "p", payloads(2))
    clock.advance(0.5)
    (kept,) = answer.result
    assert seen([kept]) == [2]
    assert engine.ack("q", Q, [(kept.id, "completed")]) == [(kept.id, "acked")]


def test_window_never_outlasts_the_pop_timeout(engine, clock):
    engine.declare("q", parse_options({"windowBuffer": {"ms": 60_000}}))
    polls = LongPolls(engine)
    answer = polls.pop("q", None, Q, 10, True, True, 1000)
    engine.push("q", "p", payloads(1))
    clock.advance(1)
    assert seen(answer.result) == [1]


def test_abandoned_pop_gives_its_messages_back_unseen(engine, clock):
    engine.declare("q", parse_options({"windowBuffer": {"ms": 5000}}))
    polls = LongPolls(engine)
    answer = polls.pop("q", None, Q, 10, False, True, 30_000)
    engine.push("q", "p", payloads(1))
    answer.cancel()
    answer.addErrback(lambda failure: failure.trap(defer.CancelledError))
    (again,) = engine.take("q", None, Q, 10, False)
    assert again.attempts == 1


def test_stop_answers_parked_pops_with_an_empty_list(engine):
    polls = LongPolls(engine)
    answer = polls.pop("q", None, Q, 5, False, True, 30_000)
    polls.stop()
    assert answer.result == []
    assert polls.pop("q", None, Q, 5, False, True, 30_000).result == []


def test_acked_leases_do_not_pile_up_in_the_timer_heap(engine):
    engine.declare("q", parse_options({"maxLength": 100_000}))
    for _ in range(3000):
        engine.push("q", "p", payloads(1))
        (got,) = engine.take("q", "p", Q, 1, False)
        engine.ack("q", Q, [(got.id, "completed")])
    assert len(engine._leases) <= 2048


def test_the_pop_that_compacts_the_lease_heap_keeps_its_lease(clock):
    # The heap is compacted when it passes 1024 entries; the pop that triggered it once
    # lost its own entry (marked leased only afterwards), so its message never came back.
    engine = EphemeralEngine(clock, Defaults(max_bytes=10_000_000, queue_max_bytes=1_000_000,
                                             queue_max_length=5000, lease_seconds=5,
                                             retry_limit=2), epoch=7)
    engine.push("q", "p", payloads(*range(1025)))
    for _ in range(1025):
        assert len(engine.take("q", "p", Q, 1, False)) == 1
    clock.advance(6)
    again = engine.take("q", "p", Q, 2000, False)
    assert seen(again) == list(range(1025))
    assert {each.attempts for each in again} == {2}


def test_idle_implicit_queues_are_forgotten_declared_ones_stay(engine, clock):
    engine.take("inbox", None, Q, 1, False)
    engine.take("parked", None, Q, 1, False)
    engine.push("full", "p", payloads(1))
    engine.declare("declared", {})
    clock.advance(301)
    assert engine.forget_idle(300, lambda name: name == "parked") == 1
    assert sorted(engine.queues) == ["declared", "full", "parked"]


def test_stored_payloads_cost_their_size_not_the_encoder_buffer():
    import tracemalloc

    from queen_tw.http.ephemeral import _payloads
    messages = [{"payload": {"id": n, "body": "x" * 80}} for n in range(2000)]
    tracemalloc.start()
    try:
        kept = _payloads(messages)
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(kept) == 2000 and size / 2000 < 400  # ~100-byte texts, not 4 KiB buffers


def test_a_window_holds_leased_messages_at_most_half_their_lease(engine, clock):
    engine.declare("q", parse_options({"windowBuffer": {"ms": 5000}, "leaseSeconds": 2}))
    polls = LongPolls(engine)
    answer = polls.pop("q", None, Q, 10, False, True, 30_000)
    engine.push("q", "p", payloads(1))
    clock.advance(0.9)
    assert not answer.called
    clock.advance(0.1)
    assert [(json.loads(d.payload), d.attempts) for d in answer.result] == [(1, 1)]


# -- declarations (a hand-driven stand-in for the pool: the race needs exact ordering) --------


class _HeldCalls:
    """Answers each ``call`` when the test says so."""

    def __init__(self):
        self.calls = []

    def call(self, function, *args):
        answer = defer.Deferred()
        self.calls.append((function, args, answer))
        return answer


def test_a_load_overtaken_by_a_configure_does_not_undo_it(engine):
    from queen_tw.ephemeral.declarations import Declarations
    db = _HeldCalls()
    declarations = Declarations(db, engine)
    loading = defer.ensureDeferred(declarations.load())
    configuring = defer.ensureDeferred(declarations.configure("q", {"maxLength": 5}))
    db.calls[1][2].callback({"queue": "q", "options": {"maxLength": 5}})
    db.calls[0][2].callback([])  # read before the configure stored its row
    assert loading.called and configuring.called
    assert engine.queues["q"].declared and engine.queues["q"].settings.max_length == 5


def test_first_requests_share_one_load(engine):
    from queen_tw.ephemeral.declarations import Declarations
    db = _HeldCalls()
    declarations = Declarations(db, engine)
    waiting = [defer.ensureDeferred(declarations.ready()) for _ in range(3)]
    assert len(db.calls) == 1 and not any(w.called for w in waiting)
    db.calls[0][2].callback([{"queue": "d", "options": {"policy": "dropOldest"}}])
    assert all(w.called for w in waiting) and declarations.loaded
    assert engine.queues["d"].settings.policy == "dropOldest"


def test_requests_wait_for_a_hung_first_load_only_briefly(engine, clock):
    from queen_tw.ephemeral.declarations import READY_WAIT_S, Declarations
    db = _HeldCalls()
    waiting = defer.ensureDeferred(Declarations(db, engine).ready())
    clock.advance(READY_WAIT_S - 0.1)
    assert not waiting.called
    clock.advance(0.1)
    assert waiting.called  # PostgreSQL never answered: the request goes on without it


def test_idle_groups_are_forgotten_unless_they_hold_a_lease(engine, clock):
    """A group per subscriber that pops once and goes: its cursors would stay in every ring
    forever, and every push and pop pays for each one."""
    engine.declare("q", parse_options({"maxLength": 10, "policy": "dropOldest",
                                       "leaseSeconds": 3600}))
    engine.push("q", "p", payloads(1, 2))
    for n in range(100):
        engine.take("q", "p", f"gone-{n}", 1, True)
    engine.take("q", "p", "holding", 1, False)  # a lease it has not acked
    clock.advance(200)
    engine.take("q", "p", "active", 1, True)
    clock.advance(100)

    engine.forget_idle(300, lambda name: False)

    queue = engine.queue("q")
    assert sorted(queue.groups) == ["active", "holding"]
    assert sorted(queue.rings["p"].cursors) == ["active", "holding"]
    assert seen(engine.take("q", "p", "gone-0", 5, True)) == [2]  # back as a new group


def test_groups_of_a_queue_with_a_parked_pop_are_kept(engine, clock):
    engine.push("q", "p", payloads(1))
    engine.take("q", "p", "g", 1, True)
    clock.advance(400)
    engine.forget_idle(300, lambda name: name == "q")
    assert list(engine.queue("q").groups) == ["g"]
