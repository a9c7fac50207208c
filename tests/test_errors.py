"""What bigpicture cannot do exactly is a ``bp.TilingError`` before the first tile runs.

Every message names the node and the op, says why, and says what to do. The cases that
do work (frozen BatchNorm while training, dropout in the head, a registered custom op, an
optimiser stepping on ``net.parameters()``) are checked to be exact.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from helpers import ClampSTE, Lambda, assert_tiled_matches
from torch import nn

import bigpicture as bp
import bigpicture.engine.execute


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: one thread is much faster than two that contend.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def conv(cin, cout, k=3, **kw):
    return nn.Conv2d(cin, cout, k, padding=k // 2, **kw)


class Wrap(nn.Module):
    """conv -> ``middle`` -> conv, so that ``middle`` stands inside the tiled part."""

    def __init__(self, middle, channels=4):
        super().__init__()
        self.first = conv(3, channels)
        self.middle = middle
        self.last = conv(channels, 2)

    def forward(self, x):
        return self.last(self.middle(self.first(x)))


def expect_error(model, x, tile=4, *fragments, multipass=True):
    """``model`` fails at plan time (no tensor, no tile) with a message holding every fragment."""
    with pytest.raises(bp.TilingError) as planned:
        bp.make_plan(model, tuple(x.shape), tile=tile, dtype=x.dtype, multipass=multipass)
    ran = []
    run_tile = bigpicture.engine.execute.Runner.run_tile
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bigpicture.engine.execute.Runner, "run_tile", lambda *a: ran.append(1) or run_tile(*a))
        with pytest.raises(bp.TilingError) as called:
            bp.tiled(model, tile=tile, multipass=multipass)(x)
    assert not ran, "a tile ran before the error"
    message = str(called.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in: {message}"
        assert fragment in str(planned.value), f"{fragment!r} not in: {planned.value}"
    return message


def image(*spatial, c=3, n=1):
    return torch.randn((n, c) + spatial, dtype=torch.float64)


# -- BatchNorm ---------------------------------------------------------------------------------


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = conv(3, 4)
        self.bn = nn.BatchNorm2d(4)
        self.out = conv(4, 2, stride=2)
        with torch.no_grad():  # nothing trivial about the statistics or the affine parameters
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)
            self.bn.weight.uniform_(0.5, 2)
            self.bn.bias.uniform_(-1, 1)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.conv(x))))


def test_train_mode_batchnorm_says_eval_or_freeze():
    model = ConvBN().double().train()
    expect_error(model, image(15, 13), 4, "node `bn`", "BatchNorm2d", "training mode", "statistics",
                 "model.eval()", "bp.freeze_batchnorm", "multipass=False", multipass=False)  # fmt: skip
    # by default it is exact with a statistics pass: tests/test_batchnorm_train.py


def test_freeze_batchnorm_trains_the_rest_with_exact_gradients():
    torch.manual_seed(0)
    model = bp.freeze_batchnorm(ConvBN().double())
    model.train()
    assert model.training and model.conv.training and not model.bn.training
    stats = model.bn.running_mean.clone(), model.bn.running_var.clone()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert {"bn.weight", "bn.bias"} <= set(names)  # the oracle compares the BN affine gradients too
    assert_tiled_matches(model, image(15, 13, n=2), 4)
    torch.testing.assert_close((model.bn.running_mean, model.bn.running_var), stats, rtol=0, atol=0)


# -- dropout -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "middle, node, op",
    [
        (nn.Dropout2d(0.3), "node `middle`", "Dropout2d"),
        (nn.Dropout(0.1), "node `middle`", "Dropout"),
        (Lambda(lambda t: F.dropout(t, 0.2, training=True)), "node `dropout`", "F.dropout"),
    ],
)
def test_train_mode_dropout_in_tiled_part(middle, node, op):
    model = Wrap(middle).double().train()
    expect_error(model, image(12, 11), 4, node, op, "random mask", "eval mode", "after a global pooling")


class DropoutHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv(3, 6), nn.ReLU(), conv(6, 8, stride=2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.drop(self.pool(self.features(x)).flatten(1)))


def test_dropout_in_the_head_after_global_pooling_is_exact():
    torch.manual_seed(0)
    model = DropoutHead().double().train()
    net = bp.tiled(model, tile=5)
    x = image(17, 14, n=2)
    results = []
    for m in (model, net):
        torch.manual_seed(7)  # the same dropout mask for both
        xi = x.clone().requires_grad_()
        y = m(xi)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(),
                                    [xi, *model.parameters()])  # fmt: skip
        results.append((y, *grads))
    torch.testing.assert_close(results[1], results[0])
    assert not torch.allclose(results[0][0], model.eval()(x)), "dropout should have changed the output"


# -- ops without a rule ------------------------------------------------------------------------


@torch.fx.wrap  # traced as one call, not inlined
def clamp_ste(x):
    return ClampSTE.apply(x)


class WithSTE(Wrap):
    def __init__(self):
        super().__init__(nn.Identity())

    def forward(self, x):
        return self.last(clamp_ste(self.first(x)))


def test_op_without_rule_shows_how_to_register(monkeypatch):
    torch.manual_seed(0)
    model = WithSTE().double()
    x = image(13, 12)
    expect_error(model, x, 4, "node `clamp_ste`", "no rule for clamp_ste", "bp.register_pointwise(clamp_ste)",
                 "@bp.rules.rule(clamp_ste)")  # fmt: skip
    monkeypatch.setattr(bp.rules, "_RULES", dict(bp.rules._RULES))  # undo the registration afterwards
    bp.register_pointwise(clamp_ste)
    assert_tiled_matches(model, x, 4)  # with the op's own (straight-through) gradient


def test_cumsum_over_a_spatial_dimension_has_no_rule():
    model = Wrap(Lambda(lambda t: torch.cumsum(t, dim=2))).double()
    expect_error(model, image(12, 12), 4, "node `cumsum`", "no rule for torch.cumsum",
                 "bp.register_pointwise(torch.cumsum)", "@bp.rules.rule(torch.cumsum)")  # fmt: skip


def test_custom_autograd_function_without_a_rule_is_named():
    # torch.fx alone would trace through ClampSTE.forward and drop its backward, silently.
    model = Wrap(Lambda(ClampSTE.apply)).double()
    expect_error(model, image(13, 12), 4, "no rule for ClampSTE", "bp.register_pointwise(ClampSTE)")


def test_registered_custom_autograd_function_is_exact(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(bp.rules, "_RULES", dict(bp.rules._RULES))
    bp.register_pointwise(ClampSTE)
    assert_tiled_matches(Wrap(Lambda(ClampSTE.apply)).double(), image(13, 12), 4)


# -- global ops in the middle of the local part ------------------------------------------------


class SqueezeExcitation(nn.Module):
    def __init__(self, c=4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        n, c = x.shape[:2]
        return x * torch.sigmoid(self.fc(self.pool(x).flatten(1))).view(n, c, 1, 1)


class Attention(nn.Module):
    def __init__(self, c=4, reshape="view"):
        super().__init__()
        self.q, self.k = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.reshape = reshape

    def forward(self, x):
        q, k, v = self.q(x).flatten(2), self.k(x).flatten(2), x.flatten(2)
        a = torch.softmax(torch.matmul(q.transpose(1, 2), k), dim=-1)
        o = torch.matmul(v, a)
        o = o.view_as(x) if self.reshape == "view_as" else o.view(x.shape)
        return x + o


GLOBAL_OPS = {
    "group_norm": (lambda: nn.GroupNorm(2, 4), ["node `middle`", "GroupNorm", "global op"]),
    "instance_norm": (
        lambda: nn.InstanceNorm2d(4),
        ["node `middle`", "InstanceNorm2d", "whole image", "track_running_stats=True"],
    ),  # fmt: skip
    "layer_norm": (lambda: nn.LayerNorm([4, 12, 12]), ["node `middle`", "LayerNorm", "global op"]),
    "group_norm_functional": (
        lambda: Lambda(lambda t: F.group_norm(t, 2)),
        ["node `group_norm_normalize`", "node `group_norm_moments`"],
    ),
    "squeeze_excitation": (
        lambda: SqueezeExcitation(),
        ["node `mul`", "operator.mul", "node `view`", "whole image"],
    ),  # fmt: skip
    "attention": (lambda: Attention(), ["node `add`", "operator.add", "whole image"]),
    "matmul_on_spatial": (
        lambda: Lambda(lambda t: torch.matmul(t, t)),
        ["node `matmul`", "torch.matmul", "global op"],
    ),  # fmt: skip
}


# Errors with multipass=False only; attention's map is held whole between passes (a global stage).
EXACT_BY_PASSES = ("attention", "group_norm", "group_norm_functional", "instance_norm", "squeeze_excitation")


@pytest.mark.parametrize("name", sorted(GLOBAL_OPS))
def test_global_op_in_the_middle(name):
    factory, fragments = GLOBAL_OPS[name]
    one_pass = name in EXACT_BY_PASSES
    model = Wrap(factory()).double().eval()
    message = expect_error(model, image(12, 12), 4, *fragments, multipass=not one_pass)
    fixes = ("multipass=False", "eval mode", "after the tiled part", "after a global pooling", "without it")
    assert any(f in message for f in fixes), message
    if one_pass:  # by default, extra passes make it exact
        assert "multipass=False allows one pass" in message and "the default" in message, message
        torch.manual_seed(0)
        assert_tiled_matches(Wrap(factory()).double().eval(), image(12, 12), 4)


def test_attention_reshaped_with_view_as_is_named_global():
    expect_error(Wrap(Attention(reshape="view_as")).double(), image(12, 12), 4, "whole image")


def test_instance_norm_with_running_stats_in_train_mode():
    # In train mode it normalises with the input's statistics: extra passes by default, an error in one pass.
    model = Wrap(nn.InstanceNorm2d(4, track_running_stats=True)).double().train()
    expect_error(model, image(12, 12), 4, "node `middle`", "InstanceNorm2d", "eval mode", multipass=False)


# -- shapes and tiles --------------------------------------------------------------------------


TOO_SMALL = {
    "conv_kernel": (lambda: nn.Sequential(nn.Conv2d(3, 4, 5), nn.MaxPool2d(3), nn.Conv2d(4, 4, 5)), (12, 12),
                    ["node `_2`", "Conv2d", "(1, 3, 12, 12)", "smaller than the network's minimum"]),
    "pool_output": (lambda: nn.Sequential(nn.MaxPool2d(2), nn.MaxPool2d(2)), (3, 3),
                    ["node `_1`", "MaxPool2d", "smaller than the network's minimum"]),
    "avg_pool_1d": (lambda: nn.Sequential(nn.Conv1d(3, 3, 3), nn.AvgPool1d(4)), (5,),
                    ["node `_1`", "AvgPool1d", "smaller than the network's minimum"]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TOO_SMALL))
def test_input_smaller_than_the_network_minimum(name):
    factory, spatial, fragments = TOO_SMALL[name]
    expect_error(factory().double(), image(*spatial), 4, *fragments, "larger input")


def test_reflect_padding_wider_than_the_input_says_the_fix():
    model = nn.Conv2d(3, 3, 3, padding=3, padding_mode="reflect").double()
    expect_error(model, image(3, 3), 4, "node `_0`", "Conv2d", "Padding size", "larger input")


@pytest.mark.parametrize("tile, spatial", [((8, 8, 8), (12, 12)), ((8,), (12, 12)), ((4, 4), (9, 9, 9))])
def test_tile_of_the_wrong_rank(tile, spatial):
    nd = len(spatial)
    model = (nn.Conv2d if nd == 2 else nn.Conv3d)(3, 2, 3).double()
    expect_error(model, image(*spatial), tile, f"tile={tile}", f"{nd}D input", f"tile={(256,) * nd}")


@pytest.mark.parametrize(
    "tile",
    [
        0,
        -4,
        (0, 4),
        (4, -1),
        4.5,
    ],
)
def test_tile_must_be_positive_ints(tile):
    expect_error(nn.Conv2d(3, 2, 3).double(), image(12, 12), tile, "tile=", "positive int")


@pytest.mark.parametrize(
    "fn, node, dims",
    [
        (lambda t: t.mean(2, keepdim=True), "node `mean`", "[2]"),
        (lambda t: torch.amax(t, dim=-1, keepdim=True), "node `amax`", "[3]"),
    ],
)
def test_partial_spatial_reduction(fn, node, dims):
    message = expect_error(Wrap(Lambda(fn)).double(), image(12, 11), 4, node, dims, "not all")
    assert "every spatial dimension" in message and "channels only" in message


@pytest.mark.parametrize(
    "fn, node, op",
    [
        (lambda t: torch.cat([t, t], dim=2), "node `cat`", "torch.cat"),
        (lambda t: torch.cat([t, t], dim=-1), "node `cat`", "torch.cat"),
        (lambda t: torch.cat(torch.chunk(t, 2, dim=3)[::-1], dim=3), "node `chunk`", "torch.chunk"),
    ],
)
def test_spatial_concatenation_and_splitting(fn, node, op):
    expect_error(Wrap(Lambda(fn)).double(), image(12, 12), 4, node, op, "a spatial one", "channel-wise")


# -- what the plan says ------------------------------------------------------------------------


def test_plan_text_names_tile_grid_halo_and_receptive_field(capsys):
    model = nn.Sequential(conv(3, 4), nn.ReLU(), conv(4, 4, k=5), nn.MaxPool2d(2)).double()
    net = bp.tiled(model, tile=8)
    assert net.plan is None
    net(image(30, 21))
    print(net.plan)
    text = capsys.readouterr().out
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in text.splitlines())
    assert rows["tile"].startswith("8 x 8 input px"), text
    assert rows["grid"].startswith("4 x 3 = 12 tiles"), text
    assert rows["halo"].startswith("-3/+3, -3/+3"), text  # the two convolutions' 1 + 2 on each side
    assert rows["receptive field"].startswith("8 x 8"), text  # a pool window of 2 grown by 1 + 2 + 2 + 1


def test_plan_text_signs_a_halo_that_crops():
    """A map sliced before its sink reads less than the tile: the halo shows signed, not "--2"."""
    model = nn.Sequential(conv(3, 4), Lambda(lambda t: t[:, :, 2:-2, 2:-2])).double()
    net = bp.tiled(model, tile=8)
    net(image(24, 24))
    text = str(net.plan)
    assert "--" not in text and "-1/" not in text, text
    assert "less work than untiled" in text or "more work than untiled" in text


def test_plan_grid_row_agrees_with_the_tile_count():
    net = bp.tiled(nn.Sequential(nn.Conv2d(3, 3, 3, stride=2), nn.Conv2d(3, 3, 3)).double(), tile=5)
    net(image(23, 21))
    grid = re.search(r"grid\s+(.*) = (\d+) cells, (\d+) tiles with work", str(net.plan))
    cells = [int(n) for n in grid.group(1).split(" x ")]
    assert cells[0] * cells[1] == int(grid.group(2)), str(net.plan)
    assert int(grid.group(3)) == len(net.plan.tiles) < int(grid.group(2)), str(net.plan)


def test_error_location_is_not_inside_bigpicture():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4)).double()
    message = expect_error(model, image(9, 9), 4, multipass=False)  # one pass: GroupNorm is an error
    assert ", in capture)" not in message and "capture.py" not in message, message


# -- a drop-in module for training -------------------------------------------------------------


class SmallClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        layers = [conv(3, 6), nn.BatchNorm2d(6), nn.ReLU(), conv(6, 8, stride=2), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.amax(self.features(x), dim=(2, 3)))


def test_sgd_on_tiled_parameters_matches_untiled_over_two_steps():
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(bp.freeze_batchnorm(SmallClassifier().double()).train())
    plain, model = models
    before = [p.detach().clone() for p in model.parameters()]
    net = bp.tiled(model, tile=6)
    assert [id(p) for p in net.parameters()] == [id(p) for p in model.parameters()]
    x, labels = image(19, 22, n=2), torch.tensor([0, 2])
    optims = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3) for m in (plain, net)]
    for _ in range(2):
        for m, opt in zip((plain, net), optims, strict=True):
            opt.zero_grad()
            F.cross_entropy(m(x), labels).backward()
            opt.step()
        for (name, a), b in zip(model.named_parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
    assert all((a != b).any() for a, b in zip(model.parameters(), before, strict=True)), (
        "every parameter should move"
    )
