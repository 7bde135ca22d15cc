"""The server keeps the cyclic garbage collector off its hot path.

``service.tune_garbage_collector`` (run once the reactor runs) freezes what start-up built and
raises the young-generation threshold. Each test here fails if the tuning does not happen, or
if it goes too far and stops cycles from being collected at all.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from queen_tw.service import GC_YOUNG_THRESHOLD, tune_garbage_collector


class Node:
    """A weak-referenceable object that can sit in a reference cycle."""

    partner: Node | None = None


def _cycle() -> weakref.ref[Node]:
    """Make a two-object cycle nobody else refers to; return a weak reference into it."""
    first, second = Node(), Node()
    first.partner, second.partner = second, first
    return weakref.ref(first)


@pytest.fixture
def restored_gc() -> Iterator[None]:
    """Undo whatever a test does to the collector, so the rest of the session is unaffected."""
    threshold, enabled = gc.get_threshold(), gc.isenabled()
    gc.collect()
    assert gc.get_freeze_count() == 0, "something else froze the heap; the test means nothing"
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        if enabled:
            gc.enable()
        gc.collect()


def test_tuning_raises_only_the_young_threshold(restored_gc):
    before = gc.get_threshold()
    assert before[0] != GC_YOUNG_THRESHOLD  # else this test could not tell

    tune_garbage_collector()

    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])


def test_objects_alive_at_start_are_frozen_and_no_collection_walks_them(restored_gc):
    started_with = Node()
    tracked_before = len(gc.get_objects())

    tune_garbage_collector()

    assert gc.get_freeze_count() >= tracked_before // 2  # the bulk of the heap, not a few
    assert not any(obj is started_with for obj in gc.get_objects())  # out of every generation
    assert gc.is_tracked(started_with)  # frozen, not untracked


def test_a_cycle_frozen_at_start_is_left_alone_even_by_a_full_collection(restored_gc):
    """Proof that frozen really means "never walked again": garbage built before the freeze
    survives ``gc.collect()``; without the tuning it would be collected."""
    held = Node()
    held.partner = held
    ref = weakref.ref(held)

    tune_garbage_collector()
    del held
    gc.collect()

    assert ref() is not None


def test_cycles_made_after_tuning_are_still_collected_without_an_explicit_collect(restored_gc):
    """The tuning must not switch collection off: allocations alone trigger a young
    collection, which reclaims a cycle made after start-up."""
    tune_garbage_collector()
    assert gc.isenabled()
    ref = _cycle()

    allocations = [[] for _ in range(3 * GC_YOUNG_THRESHOLD)]  # tracked containers, kept alive

    assert ref() is None
    assert len(allocations) == 3 * GC_YOUNG_THRESHOLD
