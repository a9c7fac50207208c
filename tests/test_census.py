"""The MONAI census as tests: every row of benchmarks/census.py gives its expected result.

Heavy rows (3D, deep or wide families) are `slow`: they run with `pytest -m slow` and in
`python benchmarks/census.py`; the default run keeps the light ones.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("monai.networks.nets")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import census  # noqa: E402

CASES = census.cases()


def _param(case):
    marks = [pytest.mark.slow] if case.heavy else []
    if case.known:
        marks.append(pytest.mark.xfail(reason=case.known, strict=True))
    return pytest.param(case, id=census.case_id(case), marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_census_row(case, request, one_thread):
    if case.heavy and "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("heavy census row: run with `pytest -m slow` or `python benchmarks/census.py`")
    row = census.run(case)
    if case.expect == "EXACT":
        assert row.status == "EXACT", row.message
    else:
        status, pattern = case.expect.split(":", 1)
        assert row.status == status, row.message
        assert re.search(pattern, row.message), row.message


def test_census_covers_both_dims_of_the_families_that_have_them():
    dims = {}
    for c in CASES:
        dims.setdefault(c.family, set()).add(c.dims)
    assert {"BasicUNet", "HighResNet", "SegResNetDS", "LocalNet", "VNet", "UNet"} <= {f for f, d in dims.items() if d == {2, 3}}
    assert all(all(t < n for t, n in zip(_tiles(c), c.shape[2:])) for c in CASES), "a tile as large as the input"


def _tiles(case):
    return case.tile if isinstance(case.tile, tuple) else (case.tile,) * case.dims
