"""The untiled nodes of a split (between passes and after the tiles), each run as soon as its
inputs are known."""

from __future__ import annotations

from torch.fx.node import map_arg

from bigpicture.engine import capture as g


class Evaluator:
    """Runs the untiled nodes, each as soon as its inputs are known (between and after passes)."""

    def __init__(self, split, args: tuple) -> None:
        self.split, self.env, self.reduced = split, {}, {}
        placeholders = [n for n in split.gm.graph.nodes if n.op == "placeholder"]
        self.env.update((n, v) for n, v in zip(placeholders[1:], args[1:]))
        self.env.update(split.statics)

    def evaluate_ready(self):
        s, env = self.split, self.env
        for node in s.gm.graph.nodes:
            if node in env or s.roles[node] == "spatial" or node.op == "placeholder":
                continue
            if node.op == "output":
                if all(i in env for i in node.all_input_nodes):
                    return map_arg(node.args[0], env.__getitem__)
                continue
            if s.roles[node] == "reduce":
                if node in self.reduced and all(i in env for i in node.all_input_nodes[1:]):
                    rest, kwargs = map_arg((node.args[1:], node.kwargs), env.__getitem__)
                    env[node] = s.ops[node].finalize(self.reduced[node], rest, kwargs)
            elif all(i in env for i in node.all_input_nodes):
                args, kwargs = map_arg((node.args, node.kwargs), env.__getitem__)
                env[node] = g.call(s.gm, node, args, kwargs)
        return None
