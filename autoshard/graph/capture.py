"""Pass 1 — capture: `torch.export` (non-strict) of a meta skeleton of the model.

The model is never materialised or mutated: parameters and buffers are swapped for `meta` tensors
in a structural copy, and the example inputs are moved to `meta` too, so planning a 70B model
costs metadata only. Batch and sequence dims of every tensor input are declared dynamic
(`Dim.AUTO`: export keeps them symbolic unless the model specialises them, e.g. size 1).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import Dim, ExportedProgram
from torch.utils._python_dispatch import _disable_current_modes

from autoshard.schema.errors import PlanError
from autoshard.graph.simplify import simplify


@dataclass
class Captured:
    """The exported program plus what is needed to call it like the original module."""

    program: ExportedProgram
    input_names: list[str]            # the forward's arguments that were passed, in signature order
    tensor_inputs: dict[str, torch.Tensor]  # example tensors (meta) by argument name
    constant_inputs: dict[str, Any]   # non-tensor arguments, baked into the graph by export
    param_fqns: dict[str, str]        # placeholder name -> parameter FQN
    buffer_fqns: dict[str, str]       # placeholder name -> buffer FQN
    constant_fqns: dict[str, str]     # placeholder name -> lifted constant name
    user_input_placeholders: list[str]
    model_name: str = ""
    tied: dict[str, str] = field(default_factory=dict)  # FQN -> the FQN it shares storage with
    seq_dim_symbols: set = field(default_factory=set)  # sympy symbols of sequence lengths
    training: bool = True             # the module mode export saw (dropout etc. are baked in)
    state_layouts: dict = field(default_factory=dict)  # buffer FQN -> Placement the module declares for state it writes


def normalize_inputs(model: torch.nn.Module, example_inputs) -> dict[str, Any]:
    """Accept `args`, `kwargs` or `(args, kwargs)`; return arguments by name, in signature order."""
    if example_inputs is None:
        example_inputs = default_example_inputs(model)
    if isinstance(example_inputs, Mapping):  # a dict, or a tokenizer's BatchEncoding (a UserDict)
        args, kwargs = (), dict(example_inputs)
    elif (
        isinstance(example_inputs, tuple)
        and len(example_inputs) == 2
        and isinstance(example_inputs[0], (tuple, list))
        and isinstance(example_inputs[1], Mapping)
    ):
        args, kwargs = tuple(example_inputs[0]), dict(example_inputs[1])
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    return bind_arguments(inspect.signature(model.forward), type(model).__name__, args, kwargs)


def bind_arguments(sig: inspect.Signature, owner: str, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments by name, in signature order (so positional and keyword calls look the same)."""
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as e:
        raise PlanError(f"inputs do not match {owner}.forward{sig}: {e}") from None
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise PlanError(f"{owner}.forward takes *args; pass inputs by name instead")
        else:
            named[name] = value
    return named


def default_example_inputs(model: torch.nn.Module) -> dict[str, Any]:
    """transformers models get small `input_ids` derived from the config; others must say."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        raise PlanError(
            f"example_inputs is required for {type(model).__name__} (only transformers models with a "
            "config.vocab_size get default inputs); pass a tuple of args, a dict of kwargs, or (args, kwargs)"
        )
    return {"input_ids": torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))}


def meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy whose parameters and buffers are `meta` tensors (ties preserved)."""
    memo: dict[int, Any] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in memo:
            continue
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def tied_parameters(model: torch.nn.Module) -> dict[str, str]:
    """Every parameter name that aliases an earlier one (tied embeddings), mapped to that one."""
    first: dict[int, str] = {}
    tied = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[name] = first[id(p)]
        else:
            first[id(p)] = name
    return tied


def _hf_defaults(model: torch.nn.Module, named: dict[str, Any]) -> dict[str, Any]:
    # A KV cache output would carry per-rank shards out of the graph; the sharded module is for
    # training and prefill, so transformers models are captured without a cache.
    if "use_cache" in inspect.signature(model.forward).parameters and "use_cache" not in named:
        if getattr(model, "config", None) is not None:
            return {**named, "use_cache": False}
    return named


_TRAINING: contextvars.ContextVar[bool | None] = contextvars.ContextVar("autoshard_capture_training", default=None)


@contextlib.contextmanager
def capture_mode(training: bool):
    """Capture in train or eval mode whatever the model's own flag (export bakes the mode in:
    dropout, batch-norm statistics); the sharded module re-captures when its mode changes."""
    token = _TRAINING.set(training)
    try:
        yield
    finally:
        _TRAINING.reset(token)


@contextlib.contextmanager
def isolated_from_caller():
    """Trace and plan the model alone. A caller's dispatch mode (CommDebugMode, FlopCounterMode)
    and the global module hooks such tools install (CommDebugMode's module tracker) would be
    traced into the program and change its graph — and with it the plan."""
    from torch.nn.modules import module as nn_module

    names = [n for n in dir(nn_module) if n.startswith("_global_") and n.endswith("hooks")]
    saved = {n: getattr(nn_module, n) for n in names}
    try:
        for n, hooks in saved.items():
            setattr(nn_module, n, type(hooks)())
        with _disable_current_modes():
            yield
    finally:
        for n, hooks in saved.items():
            setattr(nn_module, n, hooks)


def fake_skeleton(model: torch.nn.Module, device: str, mode) -> torch.nn.Module:
    """A structural copy whose parameters and buffers are fake tensors of `mode` on `device`:
    no memory, like `meta`, but code that branches on the device (transformers' MoE routing picks
    a float `histc` on CPU and an int32 one elsewhere) traces the branch the mesh will run."""
    memo: dict[int, Any] = {}
    with mode:
        for t in list(model.parameters()) + list(model.buffers()):
            if id(t) not in memo:
                fake = torch.empty(t.shape, dtype=t.dtype, device=device)
                memo[id(t)] = torch.nn.Parameter(fake, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else fake
    return copy.deepcopy(model, memo)


def retarget_devices(gm: torch.fx.GraphModule, to: torch.device, only: tuple[str, ...] | None = None) -> None:
    """Point the devices the capture recorded in `gm`'s graph and its higher-order-op bodies
    (factory ops, `to(device=...)`) at `to`: every device, or those whose type is in `only`."""
    from torch.fx.node import map_aggregate

    def fix(a):
        return to if isinstance(a, torch.device) and (only is None or a.type in only) else a

    for sub in gm.modules():
        if isinstance(sub, torch.fx.GraphModule):
            for node in sub.graph.nodes:
                node.args, node.kwargs = map_aggregate(node.args, fix), map_aggregate(node.kwargs, fix)
            sub.recompile()


def capture(model: torch.nn.Module, example_inputs, device: str = "meta") -> Captured:
    """Export `model` on metadata only. `device`: the mesh's device type ("cpu", "cuda"), so the
    graph is the one that device runs; "meta" when there is no mesh device to follow."""
    named = _hf_defaults(model, normalize_inputs(model, example_inputs))
    tensors = {k: v.to("meta") for k, v in named.items() if isinstance(v, torch.Tensor)}
    constants = {k: v for k, v in named.items() if not isinstance(v, torch.Tensor)}
    if device == "meta":
        skeleton, traced = meta_skeleton(model), tensors
    else:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        mode = FakeTensorMode(shape_env=ShapeEnv())
        skeleton = fake_skeleton(model, device, mode)
        with mode:
            traced = {k: torch.empty(v.shape, dtype=v.dtype, device=device) for k, v in tensors.items()}
    kwargs = {**{k: traced[k] if k in traced else constants[k] for k in named}}
    dynamic = {k: ({d: Dim.AUTO for d in range(min(v.ndim, 2))} if isinstance(v, torch.Tensor) else None) for k, v in kwargs.items()}
    if _TRAINING.get() is not None:
        skeleton.train(_TRAINING.get())
    _without_cache(skeleton)
    program = _export(model, skeleton, kwargs, dynamic)
    sig = program.graph_signature
    user_inputs = [s.arg.name for s in sig.input_specs if s.kind.name == "USER_INPUT"]
    captured = Captured(
        program=program,
        input_names=list(named),
        tensor_inputs=tensors,
        constant_inputs=constants,
        param_fqns=dict(sig.inputs_to_parameters),
        buffer_fqns=dict(sig.inputs_to_buffers),
        constant_fqns=dict(sig.inputs_to_lifted_tensor_constants),
        user_input_placeholders=user_inputs,
        model_name=type(model).__name__,
        tied=tied_parameters(model),
        training=skeleton.training,
        state_layouts=dict(getattr(model, "autoshard_state_layouts", None) or {}),
    )
    captured.seq_dim_symbols = _seq_symbols(program, tensors)
    simplify(program.graph_module, {ph: program.constants.get(fqn) for ph, fqn in sig.inputs_to_lifted_tensor_constants.items()})
    return captured


def _export(model: torch.nn.Module, skeleton: torch.nn.Module, kwargs: dict, dynamic: dict) -> ExportedProgram:
    """Export with dynamic batch and sequence; where the model cannot be traced symbolically
    (a data-dependent branch on a size, a broadcast export cannot prove), export at the example's
    static shapes. A static program accepts only those shapes: a call with others is captured
    again (`ShardedModule` keeps one program per accepted shape)."""
    failures = []
    for shapes in (dynamic, None):
        try:
            with isolated_from_caller():
                return torch.export.export(skeleton, (), kwargs, dynamic_shapes=shapes, strict=False)
        except Exception as e:  # noqa: BLE001 - retried static, then re-raised with guidance
            failures.append(e)
    raise PlanError(_explain_export_failure(model, failures[-1], failures[0])) from failures[-1]


def _without_cache(skeleton: torch.nn.Module) -> None:
    """transformers models are captured without a KV cache (the training forward): a cache in the
    output would carry per-rank shards out of the graph. `use_cache=False` is also passed where
    `forward` takes it; the configs say it for families whose forward reads it from the config."""
    for module in skeleton.modules():
        config = getattr(module, "config", None)
        for cfg in (config, getattr(config, "text_config", None)):
            if cfg is not None and getattr(cfg, "use_cache", None):
                try:
                    cfg.use_cache = False
                except Exception:  # noqa: BLE001 - a frozen config keeps its own setting
                    pass


def _seq_symbols(program: ExportedProgram, tensors: dict[str, torch.Tensor]) -> set:
    """Symbols of dim 1 of 2-D+ integer inputs (token ids, labels, masks): the sequence length."""
    symbols = set()
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in tensors:
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.ndim >= 2 and not val.dtype.is_floating_point:
            size = val.shape[1]
            if isinstance(size, torch.SymInt):
                symbols |= size.node.expr.free_symbols
    return symbols


def _explain_export_failure(model: torch.nn.Module, err: Exception, dynamic_err: Exception | None = None) -> str:
    """The export error, the model's source line that raised it, and what to do about it."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    name = type(model).__name__ + (f" (model_type {family!r})" if family else "")
    lines = [f"torch.export could not capture {name}: {_one_line(err)}{_where(err)}"]
    if dynamic_err is not None and dynamic_err is not err and _one_line(dynamic_err) != _one_line(err):
        lines.append(f"  (with dynamic batch/sequence first: {_one_line(dynamic_err)}{_where(dynamic_err)})")
    lines.append(
        "autoshard plans from the exported graph, so the forward must be traceable at the example's shapes: replace "
        "data-dependent Python control flow (if/while on tensor values, .item()) with torch.cond / torch.where, or "
        "bound the value with torch._check; see https://pytorch.org/docs/stable/export.html"
    )
    return "\n".join(lines)


def _one_line(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first[:400]}" if first else type(err).__name__


def _where(err: BaseException) -> str:
    frame = _user_frame(err)
    return f"\n  at {frame.filename}:{frame.lineno} in {frame.name}: {(frame.line or '').strip()}" if frame else ""


def _user_frame(err: BaseException):
    """The deepest traceback frame in the model's code: not torch, autoshard or the standard library."""
    import os
    import sysconfig
    import traceback

    skip = [os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))), sysconfig.get_paths()["stdlib"]]
    frames = []
    while err is not None:  # chained errors: export re-raises its own, the model's frame is below
        frames = [f for f in traceback.extract_tb(err.__traceback__) if not any(f.filename.startswith(p + os.sep) for p in skip)] or frames
        if frames:
            break
        err = err.__cause__ or err.__context__
    return frames[-1] if frames else None
