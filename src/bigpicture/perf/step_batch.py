"""Many nodes' steps asked at once: ``steps.steps_of`` of each (node, rows), a node's in one call.

A many-pass network (a squeeze-and-excitation network's 17-51 passes) asks each node's steps once
per pass, on rows that differ a little from pass to pass (a node's boxes grow with the network
after it). Each entry of a step is a function of its row alone, so the rows of every pass are
joined and built in one ``steps._steps_of`` call, then split back, the same numbers:

    (node, rows) of every pass --memo--> known: read back
                               --new---> by the memo's context (node, op, flags): rows joined,
                                         one ``_steps_of``, split back, each part kept in the memo

The passes share most rows' arrays (``node_rows.RowShare``: SENet154-2d at 16,384^2 asks 16,349
steps on 2,511 distinct arrays), so a rows' memo key is made once per distinct arrays; the parts
kept are read-only views of the joined step's arrays (``row_memo.freeze``), not copies.
"""

from __future__ import annotations

from bigpicture.perf import steps
from bigpicture.perf.rates import Rates
from bigpicture.perf.row_memo import freeze, join_rows, step_memo
from bigpicture.perf.steps import _FIELDS, Step, _steps_of, memo_context


def steps_many(calls: list[tuple], item: int, rates: Rates) -> list[Step]:
    """``steps_of(split, node, rows, item, rates, grad_in)`` of each (split, node, rows, grad_in) of
    ``calls``: those alike in the memo's context (``steps.memo_context``) built together."""
    out: list = [None] * len(calls)
    memo = step_memo(rates) if steps.MEMO else None
    groups: dict = {}  # context -> rows' key -> the calls on those rows
    contexts: dict = {}  # (split, node, grad_in, inputs) -> its memo context: a node is asked once per pass
    keys: dict = {}  # the rows' arrays (alive in ``calls``, so their ids stand for them) -> the rows' key
    for k, (split, node, rows, grad_in) in enumerate(calls):
        asked = (id(split), node, grad_in, *[i for i, _ in rows.inputs])
        context = contexts.get(asked)
        if context is None:
            context = contexts[asked] = memo_context(split, node, rows, item, rates, grad_in, False)
        ident = rows.ident()
        key = keys.get(ident)
        if key is None:
            key = keys[ident] = rows.key()
        found = memo.find((context, key)) if memo is not None else None
        if found is not None:
            out[k] = Step(node, tuple(split.ops[node].inputs), **found)
        else:
            groups.setdefault(context, {}).setdefault(key, []).append(k)
    for context, parts in groups.items():
        split, node, _, grad_in = calls[next(iter(parts.values()))[0]]
        rows = join_rows([calls[ks[0]][2] for ks in parts.values()])
        st, start = _steps_of(split, node, rows, item, rates, grad_in), 0
        arrays = list(freeze({f: getattr(st, f) for f in _FIELDS}).values())
        for key, ks in parts.items():
            end = start + len(calls[ks[0]][2].numel)
            fields = dict(zip(_FIELDS, [a[start:end] for a in arrays]))
            if memo is not None:
                memo.put((context, key), fields)
            for k in ks:
                out[k] = Step(node, st.inputs, **fields)
            start = end
    return out
