"""`autoshard.load(sharded, path)`: fill a sharded model's shards from a checkpoint.

Reads a transformers `save_pretrained` directory (`*.safetensors`, one file or sharded with an
index) through torch's `HuggingFaceStorageReader`, or a `torch.distributed.checkpoint`
directory, with `dcp.load`: each rank reads only the slices its shards hold (safetensors'
`get_slice`), so a rank's peak host memory is its shards plus one slice, never the checkpoint.
Part-by-part (strided) shards are read block by block (`strided_checkpoint`); values are
converted to each parameter's dtype on the way in (a bf16 checkpoint into fp32 weights); a tied
weight is read once, under whichever of its names the checkpoint has.

A model built on `meta` is materialised first (`sharded.to_empty`, which keeps the
non-persistent buffers `materialize` computed). A tensor the checkpoint lacks, or holds with
another shape, is refused before anything is read, naming it.

    >>> with torch.device("meta"):
    ...     model = AutoModelForCausalLM.from_config(config)
    >>> sharded = autoshard.autoshard(model, mesh, example_inputs=batch)
    >>> autoshard.load(sharded, "Llama-3.1-8B/")           # or autoshard(..., checkpoint=path)
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from autoshard.distributed.converted_checkpoint import ConvertedReader
from autoshard.distributed.strided_checkpoint import describe_blocks
from autoshard.schema.errors import PlanError


def load(sharded: nn.Module, path: str | os.PathLike, *, device: str | torch.device | None = None) -> nn.Module:
    """Read `path` into `sharded`'s parameters and persistent buffers in place; returns `sharded`.

    `device`: where a `meta` model is materialised (default: its mesh's device type)."""
    path = os.fspath(path)
    reader = storage_reader(path)
    if _on_meta(sharded):
        mesh = getattr(sharded, "device_mesh", None)
        sharded.to_empty(device=device or (mesh.device_type if mesh is not None else "cpu"))
    converted = None
    if isinstance(reader, dcp.HuggingFaceStorageReader):
        converted = ConvertedReader.of(path, getattr(getattr(sharded, "config", None), "model_type", None))
    state, fused = _state_to_read(sharded, reader.read_metadata().state_dict_metadata, path, converted)
    dcp.load(state, storage_reader=reader, no_dist=not (dist.is_available() and dist.is_initialized()))
    for name, target in fused.items():   # the hub's per-expert tensors, fused as the model holds them
        converted.read_into(name, target)
    return sharded


def storage_reader(path: str):
    """The reader for `path`: a DCP directory (has `.metadata`) or a safetensors one."""
    if os.path.isfile(os.path.join(path, ".metadata")):
        return dcp.FileSystemReader(path)
    if os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path)):
        return dcp.HuggingFaceStorageReader(path)
    raise PlanError(f"{path} is neither a torch.distributed.checkpoint directory (.metadata) nor a directory of "
                    "*.safetensors files (transformers save_pretrained)")


def _on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))


def _state_to_read(sharded: nn.Module, stored: dict, path: str, converted=None) -> tuple[dict, dict]:
    """`sharded.state_dict()` with each tensor once (a tied weight under the name the checkpoint
    has), checked against the checkpoint's names and shapes: (what DCP reads, what `converted`
    reads from the tensors it was fused from)."""
    by_tensor: dict[int, list[str]] = {}
    kept = sharded.state_dict(keep_vars=True)   # the Parameters themselves: a tied one is one object
    for name, t in kept.items():
        by_tensor.setdefault(id(t), []).append(name)
    state = describe_blocks({k: v.detach() for k, v in kept.items()})
    out, fused, missing, wrong = {}, {}, [], []
    for names in by_tensor.values():
        present = [n for n in names if n in stored]
        if not present:
            fusable = [n for n in names if converted is not None and converted.sources(n)]
            if fusable:
                fused[fusable[0]] = state[fusable[0]]
            else:
                missing.append(names[0])
            continue
        name = present[0]
        shape = getattr(stored[name], "size", None)
        if shape is not None and tuple(shape) != tuple(state[name].shape):
            wrong.append(f"{name} {tuple(shape)} in the checkpoint, {tuple(state[name].shape)} in the model")
        out[name] = state[name]
    if wrong:
        raise PlanError(f"{path}: tensors of another shape: " + "; ".join(wrong[:4]))
    if missing:
        extra = sorted(k for k in stored if k not in state)
        hint = (f"; the checkpoint has names the model lacks ({', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}): "
                "a layout transformers converts on load with operations autoshard cannot trace"
                if extra else "")
        raise PlanError(f"{path} has no {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
                        f"({len(missing)} tensors of the model missing){hint}")
    for name, t in fused.items():
        experts = {e for _, e in converted.sources(name)}
        if len(t.shape) == 3 and experts != set(range(t.shape[0])) and len(converted.sources(name)) > 1:
            raise PlanError(f"{path}: {name} has {t.shape[0]} experts, the checkpoint experts {sorted(experts)[:8]}")
    return out, fused
