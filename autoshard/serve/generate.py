"""`sharded.generate(input_ids, ...)`: transformers' generation semantics on the sharded programs.

Greedy decoding and sampling (temperature, top-k, top-p through transformers' own logits
warpers), `eos_token_id` stopping with `pad_token_id` filling finished rows, left-padded batches
with `attention_mask`, `max_new_tokens` / `max_length`: arguments as `GenerationMixin.generate`
takes them, defaults from the model's generation config. The loop is autoshard's own because
`GenerationMixin` drives a module by `forward(**model_inputs)` with a transformers `Cache`
object, and the sharded programs hold their cache as (sharded) state instead; every step is
what transformers' loop does (positions from the mask's cumulative sum, one new mask column
per token, finished rows padded).

Sampling is rank-consistent: the first rank of the tensor-parallel group draws, and broadcasts
the tokens to the others (one tiny broadcast per step). Greedy needs none: the logits are
gathered identically on every rank.

Example::

    sharded = autoshard(model, mesh)
    out = sharded.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=True, top_p=0.9)
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from autoshard.schema.errors import PlanError
from autoshard.serve.programs import CachedPrograms
from autoshard.serve.static_cache import sliding_window_limit

SUPPORTED = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id"}
MIN_CAPACITY = 64


class Serving:
    """What a sharded module generates with: its cached programs, made once per batch size and
    cache capacity (`sharded.generate`, `sharded.generation_programs`)."""

    def __init__(self, sharded):
        self.sharded = sharded
        self.held: dict[tuple[int, int], CachedPrograms] = {}

    def generate(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        return generate(self.sharded, input_ids, attention_mask, **kwargs)

    def programs(self, batch: int, max_length: int) -> CachedPrograms:
        return cached_programs(self.sharded, batch, max_length)


def generate(sharded, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, generation_config=None,
             generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
    """Prompt plus generated tokens, `[batch, prompt + new]`, as `model.generate` returns them."""
    config = _generation_config(sharded, generation_config, kwargs)
    batch, prompt = input_ids.shape
    new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt
    if new <= 0:
        raise PlanError(f"nothing to generate: max_new_tokens={new} for a prompt of {prompt} tokens")
    programs = cached_programs(sharded, batch, prompt + new)
    device = torch.device(sharded.tp_mesh.device_type)
    ids = input_ids.to(device)
    prompt_mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).to(device, torch.long)
    mask = torch.zeros(batch, programs.capacity, dtype=torch.long, device=device)
    mask[:, :prompt] = prompt_mask
    positions = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 1)

    eos = _token_list(config.eos_token_id)
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    choose = _Chooser(config, sharded.tp_mesh, generator)
    out = [ids]
    with torch.no_grad():
        logits = programs(ids, mask, positions, torch.arange(prompt, device=device))
        last = positions[:, -1:]
        for step in range(new):
            token = choose(logits[:, -1, :].float())
            if eos:
                token = torch.where(unfinished, token, torch.full_like(token, pad))
            out.append(token[:, None])
            if eos:
                unfinished &= ~torch.isin(token, torch.tensor(eos, device=device))
                if not unfinished.any():
                    break
            if step == new - 1:
                break
            slot = prompt + step
            mask[:, slot] = 1
            last = last + 1
            logits = programs(token[:, None], mask, last, torch.tensor([slot], device=device))
    return torch.cat(out, dim=1)


def cached_programs(sharded, batch: int, length: int) -> CachedPrograms:
    """The cached programs for `batch` sequences of up to `length` tokens, made once per batch
    size and capacity (capacities are powers of two, so most lengths reuse one)."""
    window = sliding_window_limit(getattr(sharded, "config", None))
    if window is not None and length > window:
        raise PlanError(f"generating {length} tokens needs a sliding-window cache (config.sliding_window={window}); "
                        f"the sharded cache is a full static one: generate at most {window} tokens (prompt included)")
    held = sharded._serving().held
    for (b, capacity), programs in held.items():
        if b == batch and capacity >= length:
            return programs
    capacity = max(MIN_CAPACITY, 1 << (length - 1).bit_length())
    if window is not None:
        capacity = min(capacity, window)
    held[(batch, capacity)] = CachedPrograms(sharded, batch, capacity)
    return held[(batch, capacity)]


class _Chooser:
    """The next token from the last logits: argmax, or a draw after transformers' warpers."""

    def __init__(self, config, mesh, generator):
        from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

        self.sample, self.generator, self.mesh = bool(config.do_sample), generator, mesh
        warpers = LogitsProcessorList()
        if self.sample:
            if config.temperature is not None and config.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(config.temperature))
            if config.top_k is not None and config.top_k != 0:
                warpers.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
            if config.top_p is not None and config.top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
        self.warpers = warpers

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.sample:
            return logits.argmax(-1)
        probs = torch.softmax(self.warpers(None, logits), dim=-1)
        token = torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)
        if self.mesh.size() > 1:   # every rank continues with the first rank's draw
            dist.broadcast(token, src=dist.get_global_rank(self.mesh.get_group(), 0), group=self.mesh.get_group())
        return token


def _generation_config(sharded, generation_config, kwargs: dict):
    from transformers import GenerationConfig

    unknown = sorted(set(kwargs) - SUPPORTED)
    if unknown:
        raise PlanError(f"sharded generate does not take {unknown}; it takes {sorted(SUPPORTED)} (and generation_config=)")
    if generation_config is None:
        model_config = getattr(sharded, "config", None)
        generation_config = GenerationConfig.from_model_config(model_config) if model_config is not None else GenerationConfig()
    config = copy.deepcopy(generation_config)
    config.update(**kwargs)
    return config


def _token_list(eos) -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, torch.Tensor):
        return [int(t) for t in eos.flatten()]
    return [int(t) for t in eos] if isinstance(eos, (list, tuple)) else [int(eos)]
