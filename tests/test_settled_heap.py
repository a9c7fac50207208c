"""``schedule.settled_heap``: the planner pauses the cyclic garbage collector while it plans and leaves
it as it found it (also after an error, and a collector paused already stays paused); a plan chosen
inside it is the one chosen without it."""

import contextlib
import gc

import pytest
from torch import nn

from bigpicture.perf import schedule


@pytest.fixture
def collector():
    """The collector's state put back after the test, whatever it does."""
    was = gc.isenabled()
    yield
    gc.enable() if was else gc.disable()


def test_the_collector_is_paused_inside_and_restored_after(collector):
    gc.enable()
    with schedule.settled_heap():
        assert not gc.isenabled()
        with schedule.settled_heap():  # nested: paused still, and still after it
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()


def test_it_is_restored_after_an_error(collector):
    gc.enable()
    with pytest.raises(RuntimeError, match="planning failed"), schedule.settled_heap():
        raise RuntimeError("planning failed")
    assert gc.isenabled()


def test_a_collector_paused_by_the_caller_stays_paused(collector):
    gc.disable()
    with schedule.settled_heap():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_the_search_runs_without_it_and_the_choice_is_the_same(monkeypatch, tmp_path, collector):
    monkeypatch.setenv("BIGPICTURE_CACHE", str(tmp_path / "cache"))
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 1, 3, padding=1))
    shape, seen, real = (1, 1, 96, 80), [], schedule.search

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    gc.enable()
    monkeypatch.setattr(schedule, "search", spy)
    got = schedule.choose_tile(net, shape, "2MiB", "cpu", training=True).prediction
    assert seen == [False] and gc.isenabled()
    monkeypatch.setattr(schedule, "settled_heap", contextlib.nullcontext)
    want = schedule.choose_tile(net, shape, "2MiB", "cpu", training=True).prediction
    assert seen == [False, True]
    assert (got.tile, got.time, got.memory, got.note) == (want.tile, want.time, want.memory, want.note)
