"""Pass 2 — analyse: a networkx view of the exported graph with each node's role.

Roles come from the op and from dataflow (is an operand a parameter?), never from module or
parameter names: a linear whose weight is a parameter, an embedding lookup, a normalisation
(RMSNorm inlined as pow/mean/rsqrt/mul counts as one, as do `rms_norm`/`layer_norm`), attention,
the loss, views, reductions and elementwise ops.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from enum import Enum

import networkx as nx
import torch
from torch import fx

from autoshard.graph.capture import Captured

aten = torch.ops.aten


class Role(str, Enum):
    PARAM = "param"
    BUFFER = "buffer"
    INPUT = "input"
    LINEAR = "linear"            # aten.linear with a parameter weight, or a grouped (expert) matmul
    EMBEDDING = "embedding"      # aten.embedding with a parameter table
    NORM = "norm"                # the rsqrt/mean of an inlined RMSNorm, or a fused norm op
    ATTENTION = "attention"
    LOSS = "loss"
    VIEW = "view"
    REDUCTION = "reduction"
    ELEMENTWISE = "elementwise"
    ASSERT = "assert"            # export's _assert_tensor_metadata: no users, erased in rewrite
    OTHER = "other"
    OUTPUT = "output"


ATTENTION_OPS = {aten.scaled_dot_product_attention.default}
LOSS_OPS = {aten.cross_entropy_loss.default, aten.nll_loss_forward.default, aten.nll_loss_nd.default}
NORM_OPS = {aten.rms_norm.default, aten.layer_norm.default, aten.native_layer_norm.default, aten.group_norm.default}
ASSERT_OPS = {aten._assert_tensor_metadata.default}


GROUPED_MM_SCHEMAS = {"aten::_grouped_mm", "transformers::grouped_mm_fallback"}


def is_grouped_mm(target) -> bool:
    """A grouped matmul `(x [S, K], w [E, K, N], offs [E]) -> [S, N]`: rows of x sorted by expert,
    expert e's rows multiplied by w[e]. `aten._grouped_mm` where a kernel exists (bf16 on CUDA),
    transformers' custom-op fallback elsewhere (known by name: it exists only once transformers'
    MoE code is imported)."""
    return isinstance(target, torch._ops.OpOverload) and target._schema.name in GROUPED_MM_SCHEMAS


@dataclass(frozen=True)
class WeightUse:
    """How a LINEAR node uses its parameter: which parameter dim holds the output features
    (split for a column linear) and which the input features (split for a row linear)."""

    fqn: str
    out_dim: int
    in_dim: int


@dataclass
class GraphAnalysis:
    captured: Captured
    graph: fx.Graph
    dag: nx.DiGraph                                   # node name -> node name, data edges
    roles: dict[str, Role] = field(default_factory=dict)
    nodes: dict[str, fx.Node] = field(default_factory=dict)

    def param_of(self, node: fx.Node | None) -> str | None:
        """FQN of the parameter a node *is* (a placeholder for a parameter), else None."""
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return self.captured.param_fqns.get(node.name)
        return None

    def weight(self, node: fx.Node) -> WeightUse:
        """The parameter a LINEAR node multiplies by, and its feature dims."""
        w, perm, _ = _through_transposes(node.args[1])
        if node.target is aten.linear.default:  # [out, in], or its transpose (GPT-2's Conv1D holds [in, out])
            return WeightUse(self.param_of(w), perm[0], perm[1])
        # the grouped operand is [E, K, N]: N (dim 2) the output features, K (dim 1) the input's
        return WeightUse(self.param_of(w), perm[2], perm[1])

    def weight_views(self, node: fx.Node) -> list[fx.Node]:
        """The transposes between a LINEAR node's parameter and its weight operand, first first."""
        return _through_transposes(node.args[1])[2]

    def bias_of(self, node: fx.Node) -> str | None:
        if node.target is aten.linear.default and len(node.args) > 2:
            return self.param_of(node.args[2])
        return None

    def linears(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if self.roles.get(n.name) is Role.LINEAR]

    def of_role(self, role: Role) -> list[fx.Node]:
        return [n for n in self.graph.nodes if self.roles.get(n.name) is role]


def _classify(node: fx.Node, captured: Captured) -> Role:
    if node.op == "placeholder":
        if node.name in captured.param_fqns:
            return Role.PARAM
        if node.name in captured.buffer_fqns or node.name in captured.constant_fqns:
            return Role.BUFFER
        return Role.INPUT
    if node.op == "output":
        return Role.OUTPUT
    if node.op != "call_function":
        return Role.OTHER
    target = node.target
    is_param = lambda a: isinstance(a, fx.Node) and a.op == "placeholder" and a.name in captured.param_fqns  # noqa: E731
    if target is aten.linear.default and is_param(_through_transposes(node.args[1])[0]):
        return Role.LINEAR
    if is_grouped_mm(target) and len(node.args) > 2 and is_param(_through_transposes(node.args[1])[0]):
        return Role.LINEAR
    if target is aten.embedding.default and is_param(node.args[0]):
        return Role.EMBEDDING
    if target in ATTENTION_OPS:
        return Role.ATTENTION
    if target in LOSS_OPS:
        return Role.LOSS
    if target in ASSERT_OPS:
        return Role.ASSERT
    if target in NORM_OPS or target is aten.rsqrt.default:
        return Role.NORM
    if target is operator.getitem:
        return Role.OTHER
    if isinstance(target, torch._ops.OpOverload):
        tags = target.tags
        if torch.Tag.pointwise in tags:
            return Role.ELEMENTWISE
        if target.overloadpacket in _VIEW_PACKETS:
            return Role.VIEW
        if target.overloadpacket in _REDUCTION_PACKETS:
            return Role.REDUCTION
    return Role.OTHER


def embedding_args(node: fx.Node) -> tuple:
    """`aten.embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False)`,
    every argument named or not."""
    names = ("weight", "indices", "padding_idx", "scale_grad_by_freq", "sparse")
    values = dict(zip(names, (None, None, -1, False, False)))
    values.update(zip(names, node.args))
    values.update(node.kwargs)
    return tuple(values[n] for n in names)


def _through_transposes(node) -> tuple:
    """The tensor `node` transposes (through `transpose`/`t`/`permute`), for each dim of `node`
    the dim of that tensor it is, and the transposes in between (first first)."""
    perm, chain = None, []
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in (aten.transpose.int, aten.permute.default, aten.t.default):
        ndim = node.meta["val"].ndim
        here = list(range(ndim))
        if node.target is aten.permute.default:
            here = [d % ndim for d in node.args[1]]
        elif node.target is aten.transpose.int:
            a, b = node.args[1] % ndim, node.args[2] % ndim
            here[a], here[b] = here[b], here[a]
        else:
            here = here[::-1]
        perm = here if perm is None else [here[d] for d in perm]
        chain.append(node)
        node = node.args[0]
    if perm is None:
        perm = list(range(node.meta["val"].ndim)) if isinstance(node, fx.Node) and hasattr(node.meta.get("val"), "ndim") else [0, 1, 2]
    return node, perm, chain[::-1]


_VIEW_PACKETS = {
    aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.permute, aten.unsqueeze, aten.squeeze,
    aten.expand, aten.slice, aten.select, aten.flatten, aten.unflatten, aten.t, aten.contiguous, aten.clone,
    aten.split, aten.chunk, aten.cat, aten.stack,
}
_REDUCTION_PACKETS = {aten.mean, aten.sum, aten.amax, aten.amin, aten.max, aten.min, aten.softmax, aten._softmax,
                      aten.log_softmax, aten._log_softmax, aten.var, aten.std, aten.logsumexp}


def analyse(captured: Captured) -> GraphAnalysis:
    graph = captured.program.graph
    dag = nx.DiGraph()
    result = GraphAnalysis(captured=captured, graph=graph, dag=dag)
    for node in graph.nodes:
        result.nodes[node.name] = node
        role = _classify(node, captured)
        result.roles[node.name] = role
        dag.add_node(node.name, role=role.value, target=str(node.target))
        for inp in node.all_input_nodes:
            dag.add_edge(inp.name, node.name)
    return result
