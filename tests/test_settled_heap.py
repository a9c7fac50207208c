"""``schedule.settled_heap``: the planner freezes the heap for its search (and collects its youngest
generation less often) and thaws it after, leaves
a heap frozen already as it is, and a plan chosen inside it is the one chosen without it."""

import contextlib
import gc

from torch import nn

from bigpicture.perf import schedule


def test_the_heap_is_frozen_inside_and_thawed_after():
    assert gc.get_freeze_count() == 0
    thresholds = gc.get_threshold()
    with schedule.settled_heap():
        frozen = gc.get_freeze_count()
        assert frozen > 0 and gc.get_threshold()[0] >= schedule.YOUNG
        with schedule.settled_heap():  # nested: left as it is
            assert gc.get_freeze_count() == frozen
        assert gc.get_freeze_count() == frozen
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == thresholds


def test_a_heap_frozen_by_the_caller_stays_frozen():
    gc.freeze()
    try:
        count = gc.get_freeze_count()
        with schedule.settled_heap():
            pass
        assert gc.get_freeze_count() == count
    finally:
        gc.unfreeze()


def test_the_choice_is_the_same_with_and_without_it(monkeypatch, tmp_path):
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 1, 3, padding=1))
    shape = (1, 1, 96, 80)
    got = schedule.choose_tile(net, shape, "2MiB", "cpu", training=True).prediction
    assert gc.get_freeze_count() == 0
    monkeypatch.setattr(schedule, "settled_heap", contextlib.nullcontext)
    want = schedule.choose_tile(net, shape, "2MiB", "cpu", training=True).prediction
    assert (got.tile, got.time, got.memory, got.note) == (want.tile, want.time, want.memory, want.note)

