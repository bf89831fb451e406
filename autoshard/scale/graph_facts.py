"""Facts the `autoshard plan` report reads from the captured graph: which op reads each
parameter, how attention's projections are placed (KV heads), how MoE experts run, and the
matmul FLOPs per rank. Read from dataflow, not from parameter names; the transformers config
only supplies head and expert counts for the wording.

    facts = describe_model(result, model)
    facts.why_replicated(plan.params["model.layers.3.mlp.experts.down_proj"], plan)
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass, field

import torch
from torch import fx

from autoshard.graph.analyse import GraphAnalysis, Role, analyse
from autoshard.scale.memory import local_numel
from autoshard.schema.placements import is_split

_PASS_THROUGH = {Role.VIEW, Role.ASSERT}
_UNEVEN = re.compile(r"output dimension \d+ \(size (\d+)\) is not evenly divisible by mesh dimension \d+ \(size (\d+)\)")


@dataclass
class Facts:
    analysis: GraphAnalysis | None
    container: str | None
    captured_layers: int | None
    n_layers: int | None
    config: object | None
    consumers: dict[str, list[str]] = field(default_factory=dict)   # captured FQN -> ops reading it
    tokens: int = 0

    # ---- layer mapping -------------------------------------------------------------------------
    def captured_fqn(self, fqn: str) -> str:
        """The FQN in the captured truncation that stands for `fqn` of the full model."""
        if not (self.container and self.captured_layers and fqn.startswith(self.container + ".")):
            return fqn
        head, dot, rest = fqn[len(self.container) + 1:].partition(".")
        if not head.isdigit():
            return fqn
        i, k = int(head), self.captured_layers
        j = i if i < k - 2 else (k - 1 if i == self.n_layers - 1 else k - 2)
        return f"{self.container}.{j}{dot}{rest}"

    def full_fqn(self, captured: str, layer: int) -> str:
        if not self.container:
            return captured
        return re.sub(rf"^{re.escape(self.container)}\.\d+\.", f"{self.container}.{layer}.", captured)

    # ---- parameters -----------------------------------------------------------------------------
    def why_replicated(self, p, plan) -> str:
        if p.grad_reduce:
            return p.reason
        specific = [r for r in plan.regions if r.strategy == "replicated" and (p.fqn in r.column or p.fqn in r.row)]
        specific.sort(key=lambda r: len(r.column) + len(r.row))
        if specific:
            return _explain_uneven(specific[0].reason, plan.mesh["tp"])
        ops = self.consumers.get(self.captured_fqn(p.fqn), [])
        odd = [o for o in ops if o not in ("aten.linear.default", "aten.embedding.default", "aten.mul.Tensor")]
        if odd and len(p.shape) >= 3:
            return (f"fused expert weights read by {odd[0]}: autoshard has no sharding rule for it, so every rank "
                    "holds and runs all experts (exact, no communication)")
        if odd:
            return f"read by {odd[0]}, which no shardable region contains"
        return p.reason

    # ---- per-layer sections ---------------------------------------------------------------------
    def lines(self, plan) -> list[str]:
        out = self._attention_lines(plan) + self._expert_lines(plan)
        return out or ["(no attention or expert layers found in the graph)"]

    def _template_layer_nodes(self, role: Role) -> list[fx.Node]:
        if self.analysis is None:
            return []
        nodes = self.analysis.of_role(role)
        if self.container and self.captured_layers:
            t = self.captured_layers - 2
            tagged = [n for n in nodes if _in_layer(n, self.container, t)]
            return tagged or nodes[:1]
        return nodes[:1]

    def _attention_lines(self, plan) -> list[str]:
        out = []
        for sdpa in self._template_layer_nodes(Role.ATTENTION):
            proj = {}
            for which, arg in zip(("query", "key", "value"), sdpa.args[:3]):
                lin = _producing_linear(self.analysis, arg)
                if lin is not None:
                    proj[which] = self.analysis.weight(lin).fqn
            heads = getattr(self.config, "num_attention_heads", None)
            kv = getattr(self.config, "num_key_value_heads", None) or heads
            tp = plan.mesh["tp"]
            placed = {w: plan.params[f].placement if f in plan.params else "?" for w, f in proj.items()}
            where = plan.attention.get(sdpa.name, "Replicate()")
            head_text = f"{heads} query heads, {kv} KV heads" if heads else "attention"
            out.append(f"Attention (every layer): {head_text} over tp={tp}; SDPA runs on {where}"
                       + (" (heads split)" if where == "Shard(1)" else ""))
            for w, f in proj.items():
                out.append(f"  {w:<5} projection {self._folded(f)}: {placed[w]}")
            q, k = placed.get("query", ""), placed.get("key", "")
            if q.startswith("Shard") and k == "Replicate()":
                out.append(f"  KV heads replicated: {kv} KV heads cannot be split over tp={tp}, so every rank computes all of them "
                           f"and uses those its {heads // tp if heads else '?'} query heads need (vLLM / Megatron-Core KV-head replication)")
            elif not q.startswith("Shard"):
                region = next((r for r in plan.regions if proj.get("query") in r.column), None)
                why = _explain_uneven(region.reason, tp) if region else "no legal sharded region"
                out.append(f"  attention replicated: {why}")
        return out

    def _expert_lines(self, plan) -> list[str]:
        experts = [p for p in plan.params.values() if len(p.shape) >= 3 and not p.tied_to]
        if not experts:
            return []
        n_exp = getattr(self.config, "num_experts", None) or getattr(self.config, "num_local_experts", None)
        top_k = getattr(self.config, "num_experts_per_tok", None)
        sharded = [p for p in experts if is_split(p.placement)]
        per_layer = {self._folded(p.fqn): p for p in experts}
        whole = plan.expert_parallel and all(p.placement == "Shard(0)" for p in sharded)   # experts split over ranks
        how = "expert parallel: whole experts split over ranks" if whole else "tensor parallel inside each expert"
        state = f"sharded ({how})" if sharded and len(sharded) == len(experts) else ("partly sharded" if sharded else "replicated")
        out = [f"MoE experts: {n_exp or '?'} experts per layer, top-{top_k or '?'} routing; experts {state}"]
        for name, p in per_layer.items():
            out.append(f"  {name} {'x'.join(map(str, p.shape))}: {p.placement}: {self.why_replicated(p, plan) if not is_split(p.placement) else p.reason}")
        if whole:
            out.append(f"  each rank routes its own tokens (router replicated) and sends each (token, expert) row to its expert's rank "
                       f"and back by all-to-all: 3 per MoE layer ({len(plan.expert_parallel)} layers)")
            return out
        out.append("  routing is computed identically on every rank (router replicated), so each rank's experts see the same tokens as unsharded")
        if sharded:
            out.append("  each rank holds its slice of every expert's gate/up (intermediate dim) and down (row): one reduce per MoE layer, as a dense MLP")
        return out

    def _folded(self, fqn: str) -> str:
        if not self.container:
            return fqn
        return re.sub(rf"^{re.escape(self.container)}\.\d+\.", f"{self.container}.*.", fqn)

    # ---- compute --------------------------------------------------------------------------------
    def matmul_flops_per_rank(self, plan) -> float:
        """Forward FLOPs of linears, experts (top-k of E) and attention on tp rank 0."""
        tp = plan.mesh["tp"]
        n_exp = getattr(self.config, "num_experts", None) or getattr(self.config, "num_local_experts", None)
        top_k = getattr(self.config, "num_experts_per_tok", None)
        flops = 0.0
        for p in plan.params.values():
            if p.tied_to:
                continue
            ops = self.consumers.get(self.captured_fqn(p.fqn), [])
            if "aten.linear.default" in ops:
                flops += 2 * self.tokens * local_numel(p.shape, p.placement, tp, 0)
            elif len(p.shape) >= 3 and n_exp and top_k:
                flops += 2 * self.tokens * local_numel(p.shape, p.placement, tp, 0) * top_k / n_exp
        flops += self._attention_flops(plan)
        return flops

    def _attention_flops(self, plan) -> float:
        if self.analysis is None:
            return 0.0
        tp = plan.mesh["tp"]
        per_layer = self._template_layer_nodes(Role.ATTENTION)
        layers = self.n_layers or 1
        total = 0.0
        for sdpa in per_layer:
            q = sdpa.args[0].meta.get("val")
            if not isinstance(q, torch.Tensor) or q.ndim != 4:
                continue
            b, h, s, d = (_hint(x) for x in q.shape)
            flops = 4 * b * h * s * s * d / 2  # QK^T and PV, causal half
            total += flops / (tp if plan.attention.get(sdpa.name, "").startswith("Shard") else 1)
        return total * (layers if self.container else 1)


def describe_model(result, model) -> Facts:
    captured = getattr(result, "captured", None)
    stack = result.stack
    facts = Facts(
        analysis=analyse(captured) if captured is not None else None,
        container=stack.path if stack and result.captured_layers else None,
        captured_layers=result.captured_layers,
        n_layers=stack.count if stack else None,
        config=getattr(model, "config", None),
    )
    if facts.analysis is not None:
        a = facts.analysis
        for ph, fqn in captured.param_fqns.items():
            facts.consumers[fqn] = sorted({str(op) for op in _reading_ops(a, a.nodes[ph])})
        ids = next((v for v in captured.tensor_inputs.values() if v.ndim >= 2 and not v.dtype.is_floating_point), None)
        facts.tokens = int(ids.shape[0] * ids.shape[1]) if ids is not None else 0
    return facts


def _reading_ops(a: GraphAnalysis, node: fx.Node, depth: int = 0):
    """The first non-view ops that read `node` (through transposes, views, dtype casts)."""
    for user in node.users:
        role = a.roles.get(user.name)
        cast = user.target in (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default)
        if (role in _PASS_THROUGH or cast or user.target is operator.getitem) and depth < 8:
            yield from _reading_ops(a, user, depth + 1)
        elif role is not Role.ASSERT:
            yield user.target


def _producing_linear(a: GraphAnalysis, node):
    """The nearest linear an attention operand comes from, through views, rotary and norms."""
    frontier, seen = [node], set()
    while frontier:  # breadth first: the projection, not some linear of an earlier layer
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            if a.roles.get(n.name) is Role.LINEAR:
                return n
            nxt += [x for x in n.all_input_nodes if a.roles.get(x.name) not in (Role.PARAM, Role.INPUT, Role.BUFFER)]
        frontier = nxt
    return None


def _in_layer(node: fx.Node, container: str, layer: int) -> bool:
    stack = node.meta.get("nn_module_stack") or {}
    want = f"{container}.{layer}"
    return any(isinstance(v, tuple) and (v[0] == want or v[0].startswith(want + ".")) for v in stack.values())


def _explain_uneven(reason: str, tp: int) -> str:
    m = _UNEVEN.search(reason)
    if not m:
        return reason
    return f"its output splits into {m.group(1)} heads (or groups), which do not divide evenly over tp={m.group(2)}"


def _hint(x) -> int:
    if isinstance(x, torch.SymInt):
        return int(x.node.hint) if x.node.hint is not None else int(x.node.shape_env.size_hint(x.node.expr))
    return int(x)
