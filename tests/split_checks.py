"""The cases a check of one split's class grid runs over (``split_tests``): test_batch_geometry's named
networks, MONAI SEResNet50's squeeze-and-excitation passes (each recomputes from the image: long grids,
many kinds) and random 2D and 3D networks (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from test_batch_geometry import NETWORKS
from test_pass_batch import _monai
from test_random_architectures import blueprints, examples

from bigpicture.perf.schedule import analyse


def split_tests(check) -> tuple:
    """The four tests of ``check(split, shape, tile)`` (1 if it compared, 0 if the grid has no product
    rule), for a test module to bind to its own names."""

    @pytest.mark.parametrize("name", sorted(NETWORKS))
    def test_named_networks(name):
        make, shape, tiles = NETWORKS[name]
        torch.manual_seed(0)
        compared = 0
        for split in analyse(make().eval(), shape):
            for tile in tiles:
                compared += check(split, shape, tile)
        assert compared or name in {"output padding"}

    @pytest.mark.parametrize("tile", [8, 24, (16, 40)])
    def test_senet_passes(tile):
        shape = (1, 1, 416, 352)
        torch.manual_seed(0)
        splits = analyse(_monai("SEResNet50", 2, in_channels=1, num_classes=2)().eval(), shape)
        assert sum(check(split, shape, tile) for split in splits) == len(splits)

    @examples(30)
    @given(blueprints(nd=2, dag=True, max_steps=5))
    def test_random_architectures_2d(blueprint):
        net = blueprint.build().float()
        for split in analyse(net, blueprint.input_shape):
            check(split, blueprint.input_shape, blueprint.tile)

    @examples(10)
    @given(blueprints(nd=3, dag=True, max_steps=3))
    def test_random_architectures_3d(blueprint):
        net = blueprint.build().float()
        for split in analyse(net, blueprint.input_shape):
            check(split, blueprint.input_shape, blueprint.tile)

    return test_named_networks, test_senet_passes, test_random_architectures_2d, test_random_architectures_3d
