"""Checkpoints in the hub's layout for models that fuse it on load (MoE experts), read slice by slice.

transformers 5 runs MoE experts as fused 3-D weights (`experts.gate_up_proj [E, 2I, H]`) and
writes and reads checkpoints in the hub's per-expert layout (`experts.3.w1.weight [I, H]`),
converting on load with the model type's conversion mapping (`WeightRenaming`,
`WeightConverter` with `MergeModulelist(dim=0)` then `Concatenate(dim)`). `ConvertedReader`
follows the same mapping backwards for the tensors a checkpoint lacks: each block of a rank's
shard is traced to the experts (merged dim), the parts (concatenated dim) and the rows and
columns it comes from, and only those are read (safetensors' `get_slice`). A mapping with other
operations is refused, naming it.

    >>> reader = ConvertedReader.of(path, "mixtral")
    >>> reader.sources("model.layers.0.mlp.experts.gate_up_proj")   # {(part, expert): disk key}
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor

from autoshard.distributed.strided_checkpoint import block_view, local_blocks
from autoshard.schema.errors import PlanError


@dataclass
class Converted:
    """One fused tensor of the model and where its pieces are on disk."""

    parts: dict[tuple[int, int], str] = field(default_factory=dict)   # (part, expert) -> disk key
    merge: bool = False                                               # dim 0 is the expert dim
    concat: int | None = None                                         # the parts are cut along this dim


class ConvertedReader:
    def __init__(self, files: dict[str, str], targets: dict[str, Converted]):
        self.files, self.targets = files, targets   # disk key -> file; model key -> its pieces

    @staticmethod
    def of(path: str, model_type: str | None) -> "ConvertedReader | None":
        """The reader for a safetensors directory, or None when the model type converts nothing."""
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        except ImportError:
            return None
        mapping = get_checkpoint_conversion_mapping(model_type) if model_type else None
        if not mapping:
            return None
        files = _disk_keys(path)
        renames, converters = [], []
        for c in mapping:
            ops = [type(o).__name__ for o in getattr(c, "operations", [])]
            if not ops:
                renames += list(zip(c.source_patterns, c.target_patterns))
            elif ops in (["MergeModulelist"], ["MergeModulelist", "Concatenate"]) and c.operations[0].dim == 0:
                converters.append(c)
            else:
                converters.append(None)   # an operation this reader cannot trace: its targets stay missing
        targets: dict[str, Converted] = {}
        for key in files:
            renamed = _rename(key, renames)
            for c in filter(None, converters):
                for part, pattern in enumerate(c.source_patterns):
                    found = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), renamed)
                    if found:
                        target = renamed[:found.start()] + c.target_patterns[0] + renamed[found.end():]
                        entry = targets.setdefault(target, Converted(merge=True, concat=getattr(c.operations[-1], "dim", None)
                                                                     if len(c.operations) > 1 else None))
                        entry.parts[(part, int(found.group(1)))] = key
            if renamed != key and not any(re.search(re.escape(p).replace(r"\*", r"(\d+)"), renamed)
                                          for c in filter(None, converters) for p in c.source_patterns):
                targets[renamed] = Converted(parts={(0, 0): key})
        return ConvertedReader(files, targets)

    def sources(self, name: str) -> dict[tuple[int, int], str]:
        return dict(self.targets[name].parts) if name in self.targets else {}

    def read_into(self, name: str, target: torch.Tensor) -> None:
        """Fill this rank's shard of model tensor `name` from the disk keys it was fused from."""
        from safetensors import safe_open

        conv = self.targets[name]
        handles: dict[str, object] = {}
        try:
            def get(key):
                f = self.files[key]
                if f not in handles:
                    handles[f] = safe_open(f, framework="pt")
                return handles[f].get_slice(key)

            part_sizes = self._part_sizes(conv, get)
            local = target.to_local() if isinstance(target, DTensor) else target
            for block in local_blocks(target):
                with torch.no_grad():
                    block_view(local, block).copy_(self._read_block(conv, block, part_sizes, get))
        finally:
            handles.clear()

    def _part_sizes(self, conv: Converted, get) -> list[int]:
        if conv.concat is None:
            return []
        n_parts = 1 + max(p for p, _ in conv.parts)
        first_expert = min(e for _, e in conv.parts)
        return [get(conv.parts[(p, first_expert)]).get_shape()[conv.concat - 1] for p in range(n_parts)]

    def _read_block(self, conv: Converted, block, part_sizes, get) -> torch.Tensor:
        ranges = [(g, g + size) for g, size, _ in block]
        if not conv.merge:
            return get(conv.parts[(0, 0)])[tuple(slice(a, b) for a, b in ranges)]
        experts = []
        for e in range(*ranges[0]):
            rest = ranges[1:]
            if conv.concat is None:
                experts.append(get(conv.parts[(0, e)])[tuple(slice(a, b) for a, b in rest)])
                continue
            d = conv.concat - 1   # the concatenated dim, in a per-expert tensor
            pieces, begin = [], 0
            for part, size in enumerate(part_sizes):
                a, b = max(rest[d][0], begin), min(rest[d][1], begin + size)
                if a < b:
                    sl = [slice(lo, hi) for lo, hi in rest]
                    sl[d] = slice(a - begin, b - begin)
                    pieces.append(get(conv.parts[(part, e)])[tuple(sl)])
                begin += size
            experts.append(torch.cat(pieces, dim=d))
        return torch.stack(experts)


def _rename(key: str, renames: list[tuple[str, str]]) -> str:
    for src, dst in renames:
        key = re.sub(src if any(ch in src for ch in "()[]\\^$?+") else re.escape(src), dst, key)
    return key


def _disk_keys(path: str) -> dict[str, str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    from safetensors import safe_open

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                out.update({k: os.path.join(path, name) for k in f.keys()})
    if not out:
        raise PlanError(f"{path}: no safetensors files")
    return out
