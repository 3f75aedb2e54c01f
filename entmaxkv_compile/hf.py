"""α-entmax attention for Hugging Face ``transformers`` models, ready for ``backend="entmaxkv"``.

Importing this module registers three attention implementations through ``AttentionInterface``:
``"entmax15"`` (α = 1.5), ``"sparsemax"`` (α = 2) and ``"entmax"`` (α = ``config.entmax_alpha``,
default 1.5) — plus, under the same names, a mask function in ``AttentionMaskInterface`` (without it
transformers hands the attention ``attention_mask=None`` and the model silently attends to unwritten
static-cache slots).  Select one with ``attn_implementation="entmax15"`` (``from_pretrained``, the config
or ``model.set_attn_implementation``).

The function is plain dense entmax attention — exact in eager mode, any query length — written so the
backend matches it: GQA by viewing the query heads as ``[B, Hkv, G, L, D]`` against the un-repeated
cache (no ``repeat_kv`` copy), fp32 scores, boolean mask as ``masked_fill(−inf)``, one
``entmaxkv::entmax`` node.  Under ``torch.compile(..., backend="entmaxkv")`` each decode step becomes
``entmaxkv::decode_attn``; prefill stays dense.  Works with ``StaticCache`` (``index_copy_`` writes,
static shapes) and ``DynamicCache`` (``cat``; Dynamo marks the growing length dynamic after the
first recompile).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .ops import entmax_op  # noqa: F401  (defines torch.ops.entmaxkv.entmax)

ALPHAS: dict[str, float | None] = {"entmax15": 1.5, "sparsemax": 2.0, "entmax": None}


def site_alpha(module: torch.nn.Module, alpha: float | None) -> float:
    """The α of an attention call: the registered name's, else ``config.entmax_alpha`` (default 1.5)."""
    return alpha if alpha is not None else getattr(module.config, "entmax_alpha", 1.5)


def entmax_attention(
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
    """``query[B,Hq,L,D]``, ``key/value[B,Hkv,S,D]``, mask ``[B,1,L,S]`` (bool keep / float additive).

    Returns ``(out[B,L,Hq,Dv], None)`` as transformers expects (attention weights are not returned).
    """
    a = site_alpha(module, alpha)
    b, hq, length, d = query.shape
    hkv = key.shape[1]
    scale = scaling if scaling is not None else d**-0.5
    q = query.view(b, hkv, hq // hkv, length, d)
    scores = torch.matmul(q, key.unsqueeze(2).transpose(-1, -2)).float() * scale  # [B, Hkv, G, L, S]
    if attention_mask is not None:
        mask = attention_mask.unsqueeze(1)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = torch.ops.entmaxkv.entmax(scores, a, -1).to(value.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value.unsqueeze(2))  # [B, Hkv, G, L, Dv]
    return out.reshape(b, hq, length, -1).transpose(1, 2).contiguous(), None


def entmax_mask(*args: Any, **kwargs: Any) -> Tensor | None:
    """``sdpa_mask`` that always materialises the causal mask (entmax has no ``is_causal`` shortcut)."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    """Register ``entmax15``/``sparsemax``/``entmax`` with transformers (idempotent; done at import)."""
    for name, alpha in ALPHAS.items():
        AttentionInterface.register(name, functools.partial(entmax_attention, alpha=alpha))
        AttentionMaskInterface.register(name, entmax_mask)


register()
