"""The planner's search over its tile candidates (``schedule.candidates``), largest first.

    per candidate, until one fits:   last pass's memory bound over the budget?          -> skip
                                     (one tile walked, the next 2, 4, 8, ... candidates'
                                     at once: memory_bound.py)
                                     else predict it (every class of tiles); over the
                                     budget, the other passes' bound over it too?       -> skip
    once one fits (best time T):     engine time alone >= T? (a multiplication)       -> skip
                                     time bound >= T? (a few diagonal rows, bound.py)  -> skip
                                     else as above

Every skip is exact: a skipped tile cannot be faster than the best, and on equal times the larger
tile (visited first) is kept, so the choice equals that of predicting every candidate. The last pass
(the whole network) holds the largest tiles of a squeeze-and-excitation network's 17-51 passes: its
bound alone decides most candidates, and a tile predicted to fit needs no other (the bound is below
the prediction), so the other passes are bounded only for a tile predicted over the budget: the
predictions counted are those a bound of every pass leaves under it (``tests/test_plan_passes.py``).
A tile whose grid has too many kinds of tiles to predict (``grid._listed``'s ``TilingError``) does
not fit; its error is raised only if no other tile fits.
"""

from __future__ import annotations

import math

from bigpicture.errors import TilingError
from bigpicture.perf.bound import time_bound
from bigpicture.perf.bytes_only import bytes_only
from bigpicture.perf.least import memory_prediction
from bigpicture.perf.memory_bound import least_memories
from bigpicture.perf.predict import _setting, predict_splits

ROUNDING = 1 - 1e-9  # the bound sums in another order than the prediction


def search(splits, input_shape, tiles, budget: int, dev, dtype, training: bool, least_time, exhaustive=False):
    """(the predictions made, newest and smallest first; each visited tile's memory bound; the
    ``shared`` dict of the predictions; how many tiles the time bound skipped; the predicted peak of
    the next larger tile than the choice where the time bound skipped it, for the note). ``least_time``:
    ``schedule.least_time``; ``exhaustive``: predict every tile whose memory bound fits (tests)."""
    tried, bounds, skipped, shared, best = [], {}, [], {}, math.inf
    args = (splits, input_shape, dtype)
    last: dict = {}  # the last pass's memory bounds
    errors: dict = {}  # tiles whose prediction is a TilingError, largest first
    batches: list = []  # the sizes of the memory bounds' batches so far
    earlier = range(len(splits) - 1)

    def visit(tile):
        """The prediction of ``tile`` if its memory bound may fit, else None."""
        if tile not in last:  # the largest alone; until one fits, the next smaller 2, 4, 8, ... at once
            smaller = [t for t in reversed(tiles) if math.prod(t) <= math.prod(tile)]
            rest = [t for t in smaller if t not in last and t != tile]
            batch = [tile, *rest[: 2 ** len(batches) - 1]] if last and best == math.inf else [tile]
            batches.append(len(batch))
            last.update(least_memories(*args, batch, dev, training, shared, [len(splits) - 1]))
        bounds[tile] = last[tile]
        if bounds[tile] > budget:
            return None
        try:
            p = predict_splits(*args, tile, dev, training, shared=shared)
        except TilingError as error:  # a grid of too many kinds of tiles (grid._listed): not this one
            p = error
        if isinstance(p, TilingError) or p.memory > budget:  # the other passes' bounds may skip it
            others = least_memories(*args, [tile], dev, training, shared, earlier)[tile]
            bounds[tile] = max(bounds[tile], others)
            if bounds[tile] > budget:
                return None
        if isinstance(p, TilingError):
            errors[tile] = p
            return None
        tried.insert(0, p)
        return p

    for tile in reversed(tiles):
        if best < math.inf and least_time(*args, tile, dev, training, shared) >= best:
            continue
        if best < math.inf and not exhaustive:
            bound = time_bound(*args, tile, dev, training, shared, best / ROUNDING)
            if bound is not None and bound * ROUNDING >= best:
                skipped.append(tile)
                continue
        p = visit(tile)
        if p is not None and p.memory <= budget:
            best = min(best, p.time)
    if best == math.inf and errors:  # none fits: the largest that might have, unpredictable
        raise next(iter(errors.values()))
    needs = {}
    if best < math.inf:  # the tile the note names as the next larger one: its peak, as without skips
        chosen = min((p for p in tried if p.memory <= budget), key=lambda p: (p.time, -math.prod(p.tile)))
        larger = [t for t in [*bounds, *skipped] if math.prod(t) > math.prod(chosen.tile)]
        if larger and min(larger, key=math.prod) in skipped:  # bytes only: only its memory is read
            tile = min(larger, key=math.prod)
            memory_only = {"rates": bytes_only(_setting(dev, dtype, None, shared)[1])}
            try:
                needs[tile] = predict_splits(*args, tile, dev, training, shared=memory_only).memory
            except TilingError:  # too many kinds of tiles to predict: the note names the next one known
                pass
    return tried, bounds, shared, len(skipped), needs


def least_prediction(splits, input_shape, dtype, dev, training, tried: list, bounds: dict, shared: dict):
    """The prediction of least memory among the candidates (for the error when no tile fits): those
    whose bound is below the least predicted so far are predicted, from the least bound up.

    Only their memory is asked, so they are predicted with byte-counting rates (``bytes_only.bytes_only``,
    as the memory bounds are): the bytes are the same, and the seconds, which are not, are never
    read. On a grid where every tile differs (a 2,000 px receptive field at 2,048^3: 10^4 classes)
    a CPU prediction's convolution rates cost a minute; its bytes seconds. A pass whose peak one
    tile provably holds is read off that tile's walk (``least.memory_prediction``): a
    squeeze-and-excitation network's 34-51 passes then cost a walk each, not every class's."""
    least = min(tried, key=lambda p: p.memory, default=None)
    done = {p.tile for p in tried}
    memory_only = {"rates": bytes_only(_setting(dev, dtype, None, shared)[1])}  # the search's own rates
    for tile in sorted(bounds, key=lambda t: (bounds[t], -math.prod(t))):
        if least is not None and bounds[tile] >= least.memory:
            break
        if tile not in done:
            p = memory_prediction(splits, input_shape, dtype, tile, dev, training, memory_only)
            least = p if least is None or p.memory < least.memory else least
    return least
