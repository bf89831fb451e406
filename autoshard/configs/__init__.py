"""Bundled transformers configs, so demos, tests and benchmarks never download anything.

Two kinds of config ship as ``*.json`` next to this module (package data):

* **Real-scale** configs, carrying the architecture fields of each model's published Hugging Face
  ``config.json`` (``transformers_version`` dropped, everything else as published). Build them on
  ``device="meta"``: nothing is materialised, so even Llama-3.1-405B builds in well under a second.
  Every file's ``"_source"`` key names where its values were taken from:

  ===================  ===================================  ===========================================
  name                 hub model                            published size (parameters)
  ===================  ===================================  ===========================================
  ``llama-3.1-8b``     meta-llama/Llama-3.1-8B              8.03B
  ``llama-3.1-70b``    meta-llama/Llama-3.1-70B(-Instruct)  70.6B
  ``llama-3.1-405b``   meta-llama/Llama-3.1-405B            405.85B (8 KV heads, see its ``_source``)
  ``qwen2.5-0.5b``     Qwen/Qwen2.5-0.5B                    0.49B (14 Q / 2 KV heads, tied embeddings)
  ``qwen3-32b``        Qwen/Qwen3-32B                       32.8B
  ``qwen3-30b-a3b``    Qwen/Qwen3-30B-A3B                   30.5B total / 3.3B active
  ``mistral-7b``       mistralai/Mistral-7B-v0.1 (v0.1)     7.24B
  ``mixtral-8x7b``     mistralai/Mixtral-8x7B-v0.1          46.7B
  ``deepseek-v3``      deepseek-ai/DeepSeek-V3              671B (MLA, 256 experts + 1 shared, 3 dense)
  ``gpt-oss-120b``     openai/gpt-oss-120b                  116.8B total / 5.1B active (128 experts)
  ``olmo-2-32b``       allenai/OLMo-2-0325-32B              32.2B (q/k norm over all heads)
  ===================  ===================================  ===========================================

* **Tiny** synthetic configs (``tiny-llama``, ``tiny-qwen2``, ``tiny-qwen3``, ``tiny-mistral``,
  ``tiny-qwen3-moe``, ``tiny-mixtral``): hidden size 64, 2 layers, 4 query / 2 KV heads, vocab 256,
  at most ~150k parameters, each keeping the family's distinguishing features (Qwen2 QKV bias and
  tied embeddings, Qwen3 q/k norms and ``heads * head_dim != hidden``, MoE routing, ...). Build them
  on ``"cpu"`` and run them.

API::

    load_config("Llama-3.1-8B")         # bundled name, case-insensitive ("_" == "-")
    load_config("path/to/config.json")  # or a directory holding config.json
    load_config({"model_type": "llama", "hidden_size": 64, ...})
    load_config(existing_pretrained_config)   # returned as is
    list_configs()                      # sorted bundled names
    build_model("tiny-llama")           # random weights on cpu, float32, seeded
    build_model("llama-3.1-405b", device="meta", dtype=torch.bfloat16)

Unknown names raise :class:`UnknownConfigError` (a ``KeyError`` and a ``ValueError``) whose message
lists every bundled name.
"""

from __future__ import annotations

import copy
import json
import os
from importlib import resources
from typing import Any, Mapping

import torch

__all__ = ["UnknownConfigError", "build_model", "list_configs", "load_config", "config_source"]

_SUFFIX = ".json"


class UnknownConfigError(KeyError, ValueError):
    """A config name that is neither bundled nor an existing path."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and escaped newlines included
        return str(self.args[0]) if self.args else ""


def _bundled() -> dict[str, Any]:
    """Map canonical bundled name -> importlib.resources Traversable of its json file."""
    out = {}
    for entry in resources.files(__name__).iterdir():
        if entry.is_file() and entry.name.endswith(_SUFFIX):
            out[entry.name[: -len(_SUFFIX)]] = entry
    return out


def list_configs() -> list[str]:
    """Names of the bundled configs, sorted."""
    return sorted(_bundled())


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _unknown(name: str) -> UnknownConfigError:
    names = list_configs()
    return UnknownConfigError(
        f"unknown config {name!r}: not a bundled config name and not an existing path. "
        f"Bundled configs: {', '.join(names)}. "
        "Pass one of those names (case-insensitive), a path to a config.json (or a directory holding one), "
        "a dict with a 'model_type' key, or a transformers.PretrainedConfig."
    )


def _read_bundled(name: str) -> dict:
    table = _bundled()
    key = _normalise(name)
    if key not in table:
        raise _unknown(name)
    return json.loads(table[key].read_text(encoding="utf-8"))


def config_source(name: str) -> str:
    """The ``_source`` note of a bundled config: where its values come from."""
    return _read_bundled(name).get("_source", "")


def _from_dict(values: Mapping[str, Any], name_or_path: str | None = None):
    from transformers import AutoConfig

    if "model_type" not in values:
        raise ValueError(
            "config dict has no 'model_type' key, so the transformers config class cannot be chosen; "
            f"keys given: {sorted(values)}"
        )
    values = {k: v for k, v in values.items() if not k.startswith("_")}  # "_source", "_name_or_path", ...
    values.pop("transformers_version", None)
    model_type = values.pop("model_type")
    try:
        cfg = AutoConfig.for_model(model_type, **values)
    except ValueError as exc:
        raise ValueError(f"transformers does not know model_type {model_type!r}: {exc}") from exc
    if name_or_path:
        cfg._name_or_path = name_or_path
    return cfg


def load_config(spec):
    """Return a ``transformers.PretrainedConfig`` for *spec*.

    *spec* is one of: a ``PretrainedConfig`` (returned as is); a ``dict`` holding ``model_type``
    (keys starting with ``_`` are ignored); a path to a ``config.json`` or to a directory holding
    one; or the name of a bundled config (see :func:`list_configs`), matched case-insensitively with
    ``_`` and ``-`` interchangeable. Nothing is downloaded. A fresh config object is returned on
    every call (except for the pass-through case), so callers may mutate it.
    """
    from transformers import PretrainedConfig

    if isinstance(spec, PretrainedConfig):
        return spec
    if isinstance(spec, Mapping):
        return _from_dict(spec)
    if isinstance(spec, (str, os.PathLike)):
        path = os.fspath(spec)
        if os.path.isdir(path):
            candidate = os.path.join(path, "config.json")
            if not os.path.isfile(candidate):
                raise FileNotFoundError(f"directory {path!r} holds no config.json")
            path = candidate
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
            if not isinstance(values, dict):
                raise ValueError(f"{path!r} does not hold a JSON object")
            return _from_dict(values, name_or_path=os.path.dirname(os.path.abspath(path)))
        return _from_dict(_read_bundled(path), name_or_path=_normalise(path))
    raise TypeError(
        "load_config expects a bundled name, a path, a dict with 'model_type' or a PretrainedConfig, "
        f"got {type(spec).__name__}"
    )


def build_model(config, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None, seed: int = 0):
    """Build ``AutoModelForCausalLM.from_config(config)`` with random weights, in eval mode.

    *config* is anything :func:`load_config` accepts; it is copied, never mutated.
    *device* ``"meta"`` builds under ``torch.device("meta")``, so no storage is allocated (a 405B
    model builds in well under a second); any other device builds there directly.
    *dtype* defaults to ``torch.float32`` whatever ``torch_dtype`` the config records (pass
    ``"auto"`` to use the config's own dtype, e.g. bfloat16 for the real-scale configs).
    *seed* seeds torch's RNG before initialisation, so the same call gives the same weights.
    """
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(load_config(config))
    if dtype is None:
        dtype = torch.float32
    elif dtype == "auto":
        dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    device = torch.device(device)

    if device.type == "meta":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        devices = []
        if device.type == "cuda":
            devices = [device.index if device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            if device.type == "cuda":
                torch.cuda.manual_seed_all(seed)
            with device:
                model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()
