"""A grid's classes aggregated with rows shared between nodes and passes (``classes.aggregate_passes``,
``node_rows.RowShare``) predict what they did before (``tests/_old_classes.py``): every field of the
``Prediction`` equal, over named networks (squeeze-and-excitation ones, whose passes share most nodes)
and random squeeze-and-excitation ones.
"""

from __future__ import annotations

import dataclasses

import _old_classes
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pass_batch import CASES, MODES, SETTINGS, _monai, _shared, se_networks

from bigpicture.perf import predict
from bigpicture.perf.predict import predict_splits
from bigpicture.perf.schedule import analyse


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def assert_as_before(splits, shape, tiles, setting: str, modes=MODES) -> None:
    """Each tile and mode predicted now and as before, each on fresh rates: every field equal."""
    device, dtype, _ = SETTINGS[setting]
    for training, input_grad in modes:
        for tile in tiles:
            with pytest.MonkeyPatch.context() as old:
                old.setattr(predict, "aggregate_passes", _old_classes.aggregate_passes)
                old.setattr(predict, "aggregate", _old_classes.aggregate)
                want = predict_splits(splits, shape, dtype, tile, device, training, input_grad, shared=_shared(setting))
            got = predict_splits(splits, shape, dtype, tile, device, training, input_grad, shared=_shared(setting))
            for f in dataclasses.fields(want):
                assert getattr(got, f.name) == getattr(want, f.name), (f.name, tile, training, input_grad)


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("name", CASES)
def test_named_networks_predict_as_before(name, setting):
    model, shape, tiles = CASES[name]
    torch.manual_seed(0)
    assert_as_before(analyse(model().eval(), shape), shape, tiles, setting)


@pytest.mark.parametrize("setting", SETTINGS)
def test_senet154_predicts_as_before(setting):
    """51 passes sharing most nodes; training, two tiles."""
    shape = (1, 1, 96, 80)
    splits = analyse(_monai("SENet154", 2, in_channels=1, num_classes=2)().eval(), shape)
    assert_as_before(splits, shape, [24, (32, 48)], setting, [(True, False)])


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(case=st.one_of(se_networks(2), se_networks(3)), setting=st.sampled_from(list(SETTINGS)),
       mode=st.sampled_from(MODES))  # fmt: skip
def test_random_se_networks_predict_as_before(case, setting, mode):
    model, shape, tiles = case
    torch.manual_seed(0)
    assert_as_before(analyse(model.eval(), shape), shape, tiles, setting, [mode])
