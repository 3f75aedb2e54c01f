"""``entmaxkv::decode_attn``: one decode step of entmax attention under a selection policy.

Schema (all rewritten sites use it)::

    decode_attn(q[B,Hq,Lq,D], k[B,Hkv,S,D], v[B,Hkv,S,Dv], bias[B|1,Hq|1,Lq|1,S]?, scale, alpha,
                site, config) -> out[B,Hq,Lq,Dv]

``bias`` is additive fp32 (−inf = masked: padding, causal, unwritten cache slots; finite values such
as ALiBi are added to the scores). ``alpha == 1`` marks a softmax site rewritten on the user's opt-in
(``softmax_topk``): approximate Quest-style top-k softmax, always through the reference. ``site``
identifies the rewritten attention site (it owns the per-cache metadata on the GPU path); ``config``
is the JSON of the :class:`EntmaxKVConfig`.

On CPU (and for anything the GPU kernels do not support) the op runs the plain-PyTorch reference of
the policy; on CUDA it runs the Triton kernels in :mod:`entmaxkv_compile.ops.cuda`.
"""

from __future__ import annotations

import functools
import json
import logging

import torch
from torch import Tensor

from ..config import EntmaxKVConfig
from ..reference.decode import decode_attention, softmax_topk_decode

log = logging.getLogger("entmaxkv_compile")


def config_to_json(config: EntmaxKVConfig) -> str:
    return json.dumps(config.__dict__, sort_keys=True)


@functools.lru_cache(maxsize=64)
def config_from_json(text: str) -> EntmaxKVConfig:
    return EntmaxKVConfig(**json.loads(text))


@torch.library.custom_op("entmaxkv::decode_attn", mutates_args=())
def decode_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    scale: float,
    alpha: float,
    site: int,
    config: str,
) -> Tensor:
    check_inputs(q, k, v, bias)
    cfg = config_from_json(config)
    if alpha == 1.0:  # a softmax site rewritten on opt-in (softmax_topk): Quest-style top-k, reference only
        return softmax_topk_decode(q, k, v, scale=scale, bias=bias, config=cfg)
    if q.is_cuda:
        from .cuda import decode_cuda

        out = decode_cuda(q, k, v, bias, scale, alpha, site, cfg)
        if out is not None:
            return out
    return decode_attention(q, k, v, scale=scale, alpha=alpha, bias=bias, config=cfg)[0]


def check_inputs(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> None:
    """Clear errors for inputs no decode path can run (everything else runs, exactly)."""
    if any(not t.dtype.is_floating_point for t in (q, k, v)):
        raise TypeError(f"decode_attn needs floating-point q/k/v, got {q.dtype}/{k.dtype}/{v.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"decode_attn needs 4-D q/k/v [B, H, L, D], got {q.dim()}/{k.dim()}/{v.dim()}-D")
    if len({t.device for t in (q, k, v)} | ({bias.device} if bias is not None else set())) > 1:
        raise ValueError("decode_attn: q, k, v and bias must be on one device")
    if k.shape[2] == 0:
        raise ValueError("decode_attn: the KV cache is empty (S = 0): there is nothing to attend to")


@decode_attn.register_fake
def _(q, k, v, bias, scale, alpha, site, config) -> Tensor:
    return q.new_empty(*q.shape[:-1], v.shape[-1])
