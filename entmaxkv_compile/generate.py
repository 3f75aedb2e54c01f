"""Long-context greedy generation with a Hugging Face Llama and entmax attention.

The pieces the generation example and the end-to-end benchmark share:

* :func:`build_model` — a random-init Llama-style ``LlamaForCausalLM`` from a named preset, attention
  ``"entmax15"`` (registered by :mod:`entmaxkv_compile.hf`) or any transformers implementation;
* :func:`prefill` — a chunked, exact entmax prefill into a ``StaticCache``: the prompt goes through the
  model ``chunk`` tokens at a time (query chunks × all keys written so far, causal mask), with the dense
  reference entmax; keys past the last visible one are never read, so a chunk costs
  ``Hq · chunk · end`` scores instead of ``Hq · chunk · max_cache_len``;
* :func:`reference_entmax_attention` — dense entmax attention with the arithmetic of the decode kernels
  (the oracle :func:`entmaxkv_compile.reference.decode.dense_decode`): registered as ``"entmax15_reference"``
  etc., the token reference for ``backend="entmaxkv"`` in 16-bit models (see its docstring);
* :func:`extend_cache` — fill the rest of a cache by repeating the prefilled tokens (for contexts whose
  exact prefill does not fit the time budget; the figures are about decode);
* :func:`greedy` — greedy decode steps through any callable (eager, Inductor, ``backend="entmaxkv"``),
  timed per token, optionally with each step's top-2 logit margin; :func:`first_divergence` says where two
  token streams part and how close the reference's choice was there.

Works with the ``StaticCache`` of transformers 5.17 (positions from the cache contents) and 5.24+
(positions from ``cumulative_length``): positions are never passed explicitly.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM, StaticCache
from transformers.masking_utils import AttentionMaskInterface

from . import hf
from .reference.decode import dense_decode

# Llama-3.2-1B's attention (hidden 2048 = 32 heads × D 64, 8 KV heads) is the "1b" class; "attn128" has
# the benchmark's standard attention shape (Hq 32, Hkv 8, D 128, as DESIGN.md §8) with few layers, so a
# decode step is dominated by attention the way a long-context step of a big model is.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64),
    "attn128": dict(vocab_size=32000, hidden_size=4096, intermediate_size=8192, num_hidden_layers=2,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=128),
}  # fmt: skip
PREFILL_SUFFIX = "_prefill"
REFERENCE_SUFFIX = "_reference"
DEFAULT_SCORE_BUDGET = 2**27  # fp32 scores per prefill chunk (512 MiB; the sort-based entmax needs ~10×)


def build_model(
    preset: str,
    *,
    attn: str = "entmax15",
    layers: int | None = None,
    max_positions: int = 131072,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A random-init ``LlamaForCausalLM`` (``eval()``) from :data:`PRESETS`, built on ``device``."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    sizes = dict(PRESETS[preset])
    if layers is not None:
        sizes["num_hidden_layers"] = layers
    config = LlamaConfig(**sizes, max_position_embeddings=max_positions, attn_implementation=attn)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def new_cache(model: LlamaForCausalLM, max_len: int) -> StaticCache:
    """A ``StaticCache`` of ``max_len`` slots on the model's device and dtype (allocated now)."""
    p = next(model.parameters())
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    with torch.no_grad():  # one token initialises every layer's buffers; the cache is then emptied
        model(torch.zeros(1, 1, dtype=torch.long, device=p.device), past_key_values=cache)
    reset_cache(cache)
    return cache


def reset_cache(cache: StaticCache) -> None:
    """Empty a static cache in place (buffers keep their addresses: safe under CUDA graphs)."""
    restore(cache, [(torch.zeros(()), torch.zeros(()), 0)] * len(cache.layers))


def snapshot(cache: StaticCache) -> list[tuple[Tensor, Tensor, int]]:
    """Copies of every layer's keys, values and length."""
    return [(lay.keys.clone(), lay.values.clone(), _length(lay)) for lay in cache.layers]


def restore(cache: StaticCache, snap: list[tuple[Tensor, Tensor, int]]) -> None:
    """Write a :func:`snapshot` back in place."""
    for lay, (k, v, n) in zip(cache.layers, snap):
        lay.keys.copy_(k)
        lay.values.copy_(v)
        if hasattr(lay, "cumulative_length"):  # transformers >= 5.24
            lay.cumulative_length.fill_(n)


def _length(layer: Any) -> int:
    if hasattr(layer, "cumulative_length"):
        return int(layer.cumulative_length)
    return int(layer.keys[0, 0].any(-1).sum())  # transformers 5.17 counts written (nonzero) slots


def chunked_entmax_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    alpha: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """:func:`entmaxkv_compile.hf.entmax_attention` over the keys up to the last one any query sees.

    A prefill chunk of a static cache is masked from its last position on; those keys are dropped (exact:
    masked keys never enter the entmax support), so the cost follows the causal triangle.
    """
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        visible = attention_mask.flatten(0, -2).any(0)
        n = int(visible.nonzero().max()) + 1
        key, value, attention_mask = key[:, :, :n], value[:, :, :n], attention_mask[..., :n]
    return hf.entmax_attention(module, query, key, value, attention_mask, scaling, dropout, alpha=alpha)


def reference_entmax_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    alpha: float | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Dense entmax attention computed the way ``entmaxkv::decode_attn`` computes it (no dropout).

    :func:`entmaxkv_compile.hf.entmax_attention` is the model as written: in a bf16 model its ``q·kᵀ``
    matmul rounds every score to bf16 before the fp32 entmax, and ``p`` is rounded to bf16 before ``p·v``.
    The decode op does not round there — scores are fp32 sums of exact products of the cached operands,
    entmax and ``p·v`` are fp32, the output is rounded once — so in 16-bit models the two differ by score
    rounding (~2⁻⁸ relative), enough to move a near-tied greedy token. This function is the op's oracle
    (:func:`~entmaxkv_compile.reference.decode.dense_decode`) on the whole cache: the dense decode with
    the op's arithmetic, the fair token reference for ``backend="entmaxkv"``. In fp32 models the two
    functions do the same arithmetic up to summation order.
    """
    a = hf.site_alpha(module, alpha)
    bias = attention_mask
    if bias is not None and bias.dtype == torch.bool:
        bias = torch.zeros(bias.shape, device=bias.device).masked_fill(~bias, float("-inf"))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = dense_decode(query, key, value, scale=scale, alpha=a, bias=bias)
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    """``<name>_prefill`` (chunked) and ``<name>_reference`` (oracle arithmetic) for every entmax name."""
    for name, alpha in hf.ALPHAS.items():
        for suffix, fn in (
            (PREFILL_SUFFIX, chunked_entmax_attention),
            (REFERENCE_SUFFIX, reference_entmax_attention),
        ):
            attn = functools.partial(fn, alpha=alpha)
            AttentionInterface.register(name + suffix, attn)
            AttentionMaskInterface.register(name + suffix, hf.entmax_mask)


_register()


@contextlib.contextmanager
def attention(model: LlamaForCausalLM, name: str) -> Iterator[None]:
    """Temporarily run ``model`` with attention implementation ``name``."""
    old = model.config._attn_implementation
    model.config._attn_implementation = name
    try:
        yield
    finally:
        model.config._attn_implementation = old


def prefill_chunk(model: LlamaForCausalLM, prompt_len: int, budget: int = DEFAULT_SCORE_BUDGET) -> int:
    """Tokens per prefill chunk so one chunk's fp32 scores (``Hq × chunk × prompt_len``) fit ``budget``."""
    return max(1, min(prompt_len, budget // (model.config.num_attention_heads * prompt_len)))


@torch.no_grad()
def prefill(
    model: LlamaForCausalLM, ids: Tensor, cache: StaticCache, chunk: int, progress: Any = None
) -> Tensor:
    """Run the prompt ``ids[1, L]`` into ``cache``, ``chunk`` tokens at a time; returns logits ``[1, V]``.

    Entmax attention runs as the chunked dense reference (exact); other implementations run as they are.
    """
    impl = model.config._attn_implementation
    name = impl + PREFILL_SUFFIX if impl in hf.ALPHAS else impl
    logits = None
    with attention(model, name):
        for s in range(0, ids.shape[1], chunk):
            logits = model(ids[:, s : s + chunk], past_key_values=cache, logits_to_keep=1).logits[:, -1]
            if progress is not None:
                progress.update(min(chunk, ids.shape[1] - s))
    if logits is None:
        raise ValueError("prefill needs a prompt of at least one token")
    return logits


@torch.no_grad()
def extend_cache(cache: StaticCache, filled: int, total: int) -> None:
    """Fill slots ``[filled, total)`` by repeating slots ``[0, filled)``; the cache then holds ``total``."""
    if not 0 < filled <= total:
        raise ValueError(f"need 0 < filled <= total, got filled={filled}, total={total}")
    for lay in cache.layers:
        for t in (lay.keys, lay.values):
            for pos in range(filled, total, filled):
                m = min(filled, total - pos)
                t[:, :, pos : pos + m] = t[:, :, :m]
        if hasattr(lay, "cumulative_length"):
            lay.cumulative_length.fill_(total)


@torch.no_grad()
def greedy(
    step: Callable[..., Any],
    first_logits: Tensor,
    cache: StaticCache,
    steps: int,
    on_token: Callable[[int], None] | None = None,
    margins: list[float] | None = None,
) -> tuple[list[int], list[float]]:
    """``steps`` greedy tokens from ``first_logits`` through ``step(ids, past_key_values=cache)``.

    Returns the tokens and each step's wall time in seconds (synchronised: per-token latency). With
    ``margins`` given, each step's top-1 minus top-2 logit is appended to it (outside the timed region), in
    units of the logits dtype's spacing at the top logit (ulps: 0 = a tie, 1 = one rounding step apart).
    """
    tok = first_logits.argmax(-1, keepdim=True)
    tokens, times = [int(tok)], []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = step(tok, past_key_values=cache).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        tokens.append(int(tok))  # .item() synchronises the device
        times.append(time.perf_counter() - t0)
        if margins is not None:
            margins.append(_margin_ulps(logits[0]))
        if on_token is not None:
            on_token(tokens[-1])
    return tokens, times


def _margin_ulps(logits: Tensor) -> float:
    top = logits.topk(2).values.double()
    exponent = torch.floor(torch.log2(top[0].abs().clamp_min(torch.finfo(logits.dtype).tiny)))
    return float((top[0] - top[1]) / (torch.finfo(logits.dtype).eps * 2.0**exponent))


def first_divergence(tokens: list[int], ref: list[int], ref_margins: list[float]) -> dict[str, Any] | None:
    """Where ``tokens`` first differs from ``ref`` (``None``: equal), with ``ref``'s margin there (ulps).

    Token ``i ≥ 1`` is the argmax of decode step ``i − 1``; token 0 comes from the shared prefill logits.
    """
    i = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), None)
    if i is None:
        return None if len(tokens) == len(ref) else {"token": min(len(tokens), len(ref)), "margin_ulps": None}
    return {"token": i, "margin_ulps": ref_margins[i - 1] if 0 < i <= len(ref_margins) else None}
