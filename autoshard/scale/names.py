"""Node names of a graph with `N` layers, predicted from the graph of a `K`-layer truncation.

torch.fx names a node `<base>` the first time an op is traced and `<base>_<j>` after that, `j`
counting every earlier node of that base, including nodes that later passes delete. Names are
given in tracing order, so the first `K` layers of any capture are named alike whatever `N` is.
Further layers continue with a per-position stride: node `p` of layer `i` is `base_{j + c}` where
`base_j` is node `p` of layer `i - 1`. The first layers may differ (symbolic-shape helpers are
traced once and then reused, so the stride settles after a layer or two, and layer 0 of a MoE
traces one node more); from layer `K - 3` on, this module requires three identical layers
with equal strides, node by node: same ops, same arguments (operands inside the layer
correspond, operands outside are the same prefix node or the previous layer's counterpart), same
shapes. Nodes traced after those layers (the suffix, and the `sym_size` nodes export adds last)
move up by `(N - K) * c`. Parameter placeholders carry the layer index in their name
(`p_model_layers_1_mlp_up_proj_weight`). Anything that does not hold raises `NotRepeating`.

Roles of the captured layers: 0..K-3 are kept as they are, layer `T = K - 2` is the template for
the middle layers T..N-2, layer `K - 1` is the last one (it feeds the suffix).

    names = LayerNames.from_captured(captured, "model.layers", n_layers=80)
    names.rename("linear_11", {2: 41})   # node of captured layer 2 as it is named in layer 41
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx

from autoshard.graph.capture import Captured

MIN_LAYERS = 4  # one kept before the three that must repeat
_SUFFIX = re.compile(r"^(.*)_(\d+)$")


class NotRepeating(Exception):
    """The captured layers do not repeat exactly; plan the full model instead."""


class Unsettled(NotRepeating):
    """The layers repeat but their name strides have not settled yet: capture more layers."""


def split_name(name: str) -> tuple[str, int]:
    m = _SUFFIX.match(name)
    return (m.group(1), int(m.group(2))) if m else (name, 0)


@dataclass
class LayerNames:
    container: str                        # "model.layers"
    n_layers: int                         # N of the full model, in units of `period` layers
    period: int = 1                       # layers per repeating unit (gpt-oss: sliding + full = 2)
    captured: int = 0                     # K
    layer_of: dict[str, int] = field(default_factory=dict)            # layer node -> its layer
    position: dict[str, int] = field(default_factory=dict)            # node of the last 3 -> index
    sections: list[list[str]] = field(default_factory=list)           # node names per layer
    stride: dict[str, int] = field(default_factory=dict)              # base -> names per layer
    late: set[str] = field(default_factory=set)                       # non-layer, traced after T
    placeholders: set[str] = field(default_factory=set)               # layer params/buffers
    _from_end: dict[str, int] = field(default_factory=dict, repr=False)  # node -> place from layer end

    @property
    def template(self) -> int:
        return self.captured - 2

    # ---- building ------------------------------------------------------------------------------
    @classmethod
    def from_captured(cls, captured: Captured, container: str, n_layers: int, period: int = 1) -> "LayerNames":
        """`n_layers`: the full model's layers; with `period` p, every p consecutive layers are
        one unit (the "layer" of the rest of this module)."""
        self = cls(container=container, n_layers=n_layers // period, period=period)
        fqn_layer = re.compile(rf"^{re.escape(container)}\.(\d+)\.")
        owned = {**captured.param_fqns, **captured.buffer_fqns}
        nodes: list[list[fx.Node]] = []
        starts: list[int] = []
        outside: list[fx.Node] = []
        last_outside = -1  # graph position of the latest node outside the layers
        for pos, node in enumerate(captured.program.graph.nodes):
            if node.op == "placeholder":
                m = fqn_layer.match(owned.get(node.name, ""))
                if m:
                    self.layer_of[node.name] = int(m.group(1)) // period
                    self.placeholders.add(node.name)
                continue
            layer = self._stack_layer(node)
            if layer is None:
                outside.append(node)
                last_outside = pos
                continue
            if layer < len(nodes) - 1 or layer > len(nodes):
                raise NotRepeating(f"{node.name} of layer {layer} traced out of order")
            if layer == len(nodes):
                if nodes and last_outside > starts[-1]:
                    raise NotRepeating(f"{outside[-1].name} ({outside[-1].target}) runs between layers {layer - 1} and {layer}")
                nodes.append([])
                starts.append(pos)
            self.layer_of[node.name] = layer
            nodes[layer].append(node)
        self.captured = len(nodes)
        if self.captured < MIN_LAYERS:
            raise NotRepeating(f"expected at least {MIN_LAYERS} layers under {container} in the graph, found {self.captured}")
        self.sections = [[n.name for n in s] for s in nodes]
        self._match_last_layers(nodes)
        self._classify_outside(outside, nodes[self.template])
        return self

    def _stack_layer(self, node: fx.Node) -> int | None:
        stack = node.meta.get("nn_module_stack")
        if not isinstance(stack, dict):
            return None
        prefix = self.container + "."
        for value in stack.values():
            path = _normalise_path(value[0] if isinstance(value, tuple) else str(value))
            if path.startswith(prefix):
                head = path[len(prefix):].split(".", 1)[0]
                if head.isdigit():
                    return int(head) // self.period
        return None

    def _match_last_layers(self, nodes: list[list[fx.Node]]) -> None:
        k = self.captured
        last3 = nodes[k - 3:]
        if any(len(s) != len(last3[0]) for s in last3):
            raise NotRepeating(f"layers {k - 3}..{k - 1} trace {[len(s) for s in last3]} nodes")
        index = {n.name: p for s in last3 for p, n in enumerate(s)}
        self.position = index
        self._from_end = {n.name: len(s) - p for s in nodes for p, n in enumerate(s)}
        strides: dict[int, int] = {}
        for i in (k - 2, k - 1):
            for p, (a, b) in enumerate(zip(nodes[i - 1], nodes[i])):
                if a.op != b.op or a.target != b.target or not _same_val(a, b):
                    raise NotRepeating(f"layer {i} node {b.name} ({b.target}) differs from {a.name} ({a.target})")
                if not self._same_args((a.args, a.kwargs), (b.args, b.kwargs), i - 1, i, index):
                    raise NotRepeating(f"layer {i} node {b.name} reads other operands than {a.name}")
                (base_a, ja), (base_b, jb) = split_name(a.name), split_name(b.name)
                if base_a != base_b or jb <= ja:
                    raise NotRepeating(f"names {a.name} -> {b.name} do not follow fx's counter")
                if strides.setdefault(p, jb - ja) != jb - ja:
                    raise Unsettled(f"{base_b} names still change stride at layer {i} ({a.name} -> {b.name})")
                if self.stride.setdefault(base_b, jb - ja) != jb - ja:
                    raise Unsettled(f"{base_b} nodes are not a fixed number per layer ({b.name})")

    def _same_args(self, x, y, la: int, lb: int, index) -> bool:
        if isinstance(x, fx.Node) and isinstance(y, fx.Node):
            if x is y:  # a prefix node, or a symbolic size an earlier layer computed and all reuse
                return True
            ax, ay = self.layer_of.get(x.name), self.layer_of.get(y.name)
            if x.name in self.placeholders or y.name in self.placeholders:
                return ax == la and ay == lb and self._shift_placeholder(x.name, la, lb) == y.name
            if ax == la:  # inside the layer: the corresponding node
                return ay == lb and index.get(y.name) == index[x.name]
            if ax is not None:  # the previous layer's node (its output): the counterpart, counted from the end
                return ax == la - 1 and ay == lb - 1 and self._from_end[x.name] == self._from_end[y.name]
            return False
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            return len(x) == len(y) and all(self._same_args(u, v, la, lb, index) for u, v in zip(x, y))
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(self._same_args(x[k], y[k], la, lb, index) for k in x)
        if isinstance(x, fx.Node) or isinstance(y, fx.Node):
            return False
        return type(x) is type(y) and x == y

    def _classify_outside(self, outside: list[fx.Node], template: list[fx.Node]) -> None:
        span: dict[str, tuple[int, int]] = {}
        for node in template:
            base, j = split_name(node.name)
            lo, hi = span.get(base, (j, j))
            span[base] = (min(lo, j), max(hi, j))
        for node in outside:
            base, j = split_name(node.name)
            if base not in span:
                continue
            lo, hi = span[base]
            if lo <= j <= hi:
                raise NotRepeating(f"{node.name} is numbered among layer {self.template}'s {base} nodes")
            if j > hi:
                self.late.add(node.name)

    # ---- renaming ------------------------------------------------------------------------------
    def _shift_placeholder(self, name: str, src: int, dst: int) -> str:
        tag = self.container.replace(".", "_")   # the index is the layer's, a unit is `period` layers
        return re.sub(rf"{re.escape(tag)}_(\d+)_", lambda m: f"{tag}_{int(m.group(1)) + (dst - src) * self.period}_", name, count=1)

    def is_numbered(self, name: str) -> bool:
        return name in self.placeholders or _SUFFIX.match(name) is not None

    def rename(self, name: str, layer_map: dict[int, int]) -> str:
        """`name` in the full graph: a node of captured layer `i` moves to layer `layer_map[i]`
        (unmapped: stays); a node traced after the template layer moves up by the inserted layers."""
        src = self.layer_of.get(name)
        if src is not None:
            dst = layer_map.get(src, src)
            if dst == src:
                return name
            if name in self.placeholders:
                return self._shift_placeholder(name, src, dst)
            if name not in self.position or dst < self.captured - 3:
                raise NotRepeating(f"cannot move {name} from layer {src} to layer {dst}")
            p = self.position[name]
            if dst < self.captured:
                return self.sections[dst][p]
            base, j = split_name(self.sections[-1][p])
            return f"{base}_{j + (dst - self.captured + 1) * self.stride[base]}"
        if name in self.late:
            base, j = split_name(name)
            return f"{base}_{j + (self.n_layers - self.captured) * self.stride[base]}"
        return name

    def rename_fqn(self, fqn: str, layer_map: dict[int, int]) -> str:
        prefix = self.container + "."
        if not fqn.startswith(prefix):
            return fqn
        head, dot, rest = fqn[len(prefix):].partition(".")
        if not head.isdigit() or int(head) // self.period not in layer_map:
            return fqn
        unit, phase = divmod(int(head), self.period)
        return f"{prefix}{layer_map[unit] * self.period + phase}{dot}{rest}"

    def layer_named(self, token: str) -> int | None:
        """The captured layer a token (node name or FQN) belongs to, if any. A bare op name
        ("linear", "mean") is read as a word, not as the first node of that op."""
        if token in self.layer_of:
            return self.layer_of[token] if self.is_numbered(token) else None
        prefix = self.container + "."
        if token.startswith(prefix):
            head = token[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                return int(head) // self.period
        return None


def _normalise_path(path: str) -> str:
    # strict export writes "L['self'].model.layers[0]"; non-strict "model.layers.0"
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\[(\d+)\]", r".\1", path)


def _same_val(a: fx.Node, b: fx.Node) -> bool:
    return _val_key(a.meta.get("val")) == _val_key(b.meta.get("val"))


def _val_key(v):
    if isinstance(v, torch.Tensor):
        return ("tensor", v.dtype, str(v.shape))
    if isinstance(v, (list, tuple)):
        return tuple(_val_key(x) for x in v)
    return type(v).__name__
