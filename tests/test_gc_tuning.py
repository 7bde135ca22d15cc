"""The server keeps the cyclic garbage collector off its hot path (service.tune_garbage_collector)."""

import gc

from queen_tw.service import GC_YOUNG_THRESHOLD, tune_garbage_collector


def test_tuning_freezes_what_start_up_built_and_raises_the_young_threshold():
    before = gc.get_threshold()
    try:
        tune_garbage_collector()

        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_cycles_are_still_collected_after_tuning():
    before = gc.get_threshold()
    try:
        tune_garbage_collector()
        cycle = []
        cycle.append(cycle)
        del cycle

        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
