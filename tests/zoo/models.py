"""A zoo of tiny decoders whose attention is written in the styles real entmax code uses.

Every variant is the same small decoder (embedding → layers of q/k/v projections, RoPE, a KV cache,
attention, output projection → LM head); only the attention core differs.  Each core is an ordinary
eager function in one style — the backend must find it in the Dynamo graph without help.

Caches: ``static`` buffers written with ``index_copy_`` (shapes never change: no recompiles), or
``dynamic`` module attributes grown with ``torch.cat`` (one recompile to a dynamic length).
Masks are built in the graph from the query positions: ``valid[L, S]`` is True where key ``j`` is at or
before query ``i`` (and, for the static cache, written).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import entmax
import torch
import torch.nn.functional as F
from entmax.activations import Entmax15Function
from torch import Tensor, nn

from entmaxkv_compile.reference.entmax import entmax as project_entmax

Attend = Callable[["Layer", Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def repeat_kv(x: Tensor, n: int) -> Tensor:
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)


def sort_entmax15(x: Tensor, dim: int = -1) -> Tensor:
    """1.5-entmax by sorting (Peters et al., 2019), written out by hand."""
    x = x / 2
    x = x - x.amax(dim, keepdim=True)
    xs, _ = torch.sort(x, dim=dim, descending=True)
    shape = [1] * x.dim()
    shape[dim] = -1  # ρ runs along ``dim`` (it broadcast along the last axis: any other dim raised)
    rho = torch.arange(1, x.shape[dim] + 1, dtype=x.dtype, device=x.device).view(shape)
    mean = xs.cumsum(dim) / rho
    mean_sq = (xs * xs).cumsum(dim) / rho
    delta = ((1 - rho * (mean_sq - mean**2)) / rho).clamp(min=0)
    tau = mean - delta.sqrt()
    support = (tau <= xs).sum(dim, keepdim=True)
    return (x - tau.gather(dim, support - 1)).clamp(min=0) ** 2


def bisect_entmax(x: Tensor, alpha: float, dim: int = -1, n_iter: int = 40) -> Tensor:
    """α-entmax by bisection on the threshold, written out by hand."""
    z = x * (alpha - 1)
    hi = z.amax(dim, keepdim=True)
    lo = hi - 1
    for _ in range(n_iter):
        mid = (lo + hi) / 2
        mass = (z - mid).clamp(min=0).pow(1 / (alpha - 1)).sum(dim, keepdim=True)
        lo, hi = torch.where(mass >= 1, mid, lo), torch.where(mass >= 1, hi, mid)
    p = (z - lo).clamp(min=0).pow(1 / (alpha - 1))
    return p / p.sum(dim, keepdim=True)


# ---------------------------------------------------------------------------------------- attention cores
# (layer, q[B,H,L,D], k[B,Hkv,S,D], v[B,Hkv,S,D], valid[L,S] bool, qpos[L], kpos[S]) -> [B,H,L,D]


def hf_eager_entmax15(layer, q, k, v, valid, qpos, kpos):
    """HF ``eager_attention_forward`` with entmax15: repeat_kv, matmul·scale, additive mask, fp32 probs."""
    k, v = repeat_kv(k, layer.groups), repeat_kv(v, layer.groups)
    mask = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill(~valid, float("-inf"))
    scores = torch.matmul(q, k.transpose(2, 3)) * layer.scale + mask
    probs = entmax.entmax15(scores.float(), dim=-1).to(q.dtype)
    probs = F.dropout(probs, p=0.1, training=layer.training)
    return torch.matmul(probs, v)


def einsum_sparsemax(layer, q, k, v, valid, qpos, kpos):
    """einsum products, divide by √d, ``masked_fill(~valid, -inf)``, ``entmax.sparsemax`` (MHA)."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(q.shape[-1])
    probs = entmax.sparsemax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v)


def bmm_entmax15_module(layer, q, k, v, valid, qpos, kpos):
    """Pre-scaled q, flattened ``bmm``, ``where`` mask, the ``entmax.Entmax15`` module (MHA)."""
    b, h, length, d = q.shape
    s = k.shape[2]
    qf = (q * layer.scale).reshape(b * h, length, d)
    scores = torch.bmm(qf, k.reshape(b * h, s, d).transpose(1, 2)).view(b, h, length, s)
    probs = layer.normaliser(torch.where(valid, scores, float("-inf")))
    return torch.bmm(probs.view(b * h, length, s), v.reshape(b * h, s, d)).view(b, h, length, d)


def interleave_bisect(layer, q, k, v, valid, qpos, kpos):
    """GQA by ``repeat_interleave``, ``q @ k.mT``, finfo.min fill, ``entmax_bisect(alpha=1.33)``."""
    k, v = k.repeat_interleave(layer.groups, dim=1), v.repeat_interleave(layer.groups, dim=1)
    scores = (q @ k.mT) * layer.scale
    scores = scores.masked_fill(valid == 0, torch.finfo(scores.dtype).min)
    return entmax.entmax_bisect(scores, alpha=1.33, dim=-1) @ v


def grouped_alibi_param_alpha(layer, q, k, v, valid, qpos, kpos):
    """Grouped 5-D GQA (no copy), ALiBi + mask as one additive bias, fp32 upcast,
    ``EntmaxBisect`` with a learned (tensor) alpha."""
    b, h, length, d = q.shape
    hkv = k.shape[1]
    qg = q.view(b, hkv, h // hkv, length, d)
    scores = (qg @ k[:, :, None].transpose(-1, -2)).float() * layer.scale
    alibi = layer.slopes.view(hkv, h // hkv, 1, 1) * (kpos - qpos[:, None]).float()
    bias = torch.where(valid, alibi, float("-inf"))
    probs = layer.normaliser(scores + bias).to(q.dtype)
    return (probs @ v[:, :, None]).reshape(b, h, length, d)


def tile_project_entmax(layer, q, k, v, valid, qpos, kpos):
    """Heads shared by ``repeat`` (head h reads KV head h % Hkv), the project's reference entmax."""
    k, v = k.repeat(1, layer.groups, 1, 1), v.repeat(1, layer.groups, 1, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * layer.scale
    return torch.matmul(project_entmax(scores.masked_fill(~valid, float("-inf")), alpha=1.5), v)


def handwritten_sort(layer, q, k, v, valid, qpos, kpos):
    """A hand-written sort-based 1.5-entmax (GQA by repeat_kv)."""
    k, v = repeat_kv(k, layer.groups), repeat_kv(v, layer.groups)
    scores = torch.matmul(q, k.transpose(-1, -2)) * layer.scale
    return torch.matmul(sort_entmax15(scores.masked_fill(~valid, float("-inf"))), v)


def handwritten_bisect(layer, q, k, v, valid, qpos, kpos):
    """A hand-written bisection α-entmax, α = 1.6 (MHA)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * layer.scale
    return torch.matmul(bisect_entmax(scores.masked_fill(~valid, float("-inf")), alpha=1.6), v)


def entmax_op_bool_mask(layer, q, k, v, valid, qpos, kpos):
    """The project's op called directly, GQA by repeat_kv, fp32 scores of a bf16 model."""
    k, v = repeat_kv(k, layer.groups), repeat_kv(v, layer.groups)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * layer.scale
    probs = torch.ops.entmaxkv.entmax(scores.masked_fill(~valid, float("-inf")), 1.5, -1)
    return torch.matmul(probs.to(v.dtype), v)


def function_apply(layer, q, k, v, valid, qpos, kpos):
    """``Entmax15Function.apply`` called directly: bypasses the polyfills, Dynamo inlines it."""
    k, v = repeat_kv(k, layer.groups), repeat_kv(v, layer.groups)
    scores = torch.matmul(q, k.transpose(-1, -2)) * layer.scale
    probs = Entmax15Function.apply(scores.masked_fill(~valid, float("-inf")), -1, None)
    return torch.matmul(probs, v)


def softmax_attention(layer, q, k, v, valid, qpos, kpos):
    """Ordinary softmax attention (negative case)."""
    k, v = repeat_kv(k, layer.groups), repeat_kv(v, layer.groups)
    scores = torch.matmul(q, k.transpose(-1, -2)) * layer.scale
    return torch.matmul(torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1), v)


def learned_alpha_bisect() -> nn.Module:
    """``EntmaxBisect`` whose alpha is a parameter (as in adaptively sparse transformers)."""
    module = entmax.EntmaxBisect(dim=-1)
    module.alpha = nn.Parameter(torch.tensor(1.25))
    return module


# ---------------------------------------------------------------------------------------- the decoder


def rope(x: Tensor, pos: Tensor) -> Tensor:
    d = x.shape[-1]
    freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)
    angle = pos.float()[:, None] * freq[None, :]
    cos, sin = torch.cat([angle.cos()] * 2, -1).to(x.dtype), torch.cat([angle.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Layer(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        hd, h, hkv = spec.head_dim, spec.heads, spec.kv_heads
        self.attend, self.heads, self.kv_heads, self.head_dim = spec.attend, h, hkv, hd
        self.groups, self.scale, self.cache = h // hkv, hd**-0.5, spec.cache
        self.q = nn.Linear(spec.hidden, h * hd, bias=False)
        self.k = nn.Linear(spec.hidden, hkv * hd, bias=False)
        self.v = nn.Linear(spec.hidden, hkv * hd, bias=False)
        self.o = nn.Linear(h * hd, spec.hidden, bias=False)
        self.normaliser = spec.normaliser() if spec.normaliser else None
        self.slopes = nn.Parameter(2.0 ** -torch.arange(1, h + 1, dtype=torch.float32), requires_grad=False)
        if spec.cache == "static":
            shape = (spec.batch, hkv, spec.max_len, hd)
            self.register_buffer("k_cache", torch.zeros(shape))
            self.register_buffer("v_cache", torch.zeros(shape))
        else:
            self.k_cache = self.v_cache = None

    def forward(self, x: Tensor, qpos: Tensor) -> Tensor:
        b, length, _ = x.shape
        q = rope(self.q(x).view(b, length, self.heads, self.head_dim).transpose(1, 2), qpos)
        k = rope(self.k(x).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2), qpos)
        v = self.v(x).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.cache == "static":
            self.k_cache.index_copy_(2, qpos, k)
            self.v_cache.index_copy_(2, qpos, v)
            keys, values = self.k_cache, self.v_cache
        else:
            keys = k if self.k_cache is None else torch.cat([self.k_cache, k], dim=2)
            values = v if self.v_cache is None else torch.cat([self.v_cache, v], dim=2)
            self.k_cache, self.v_cache = keys, values
        kpos = torch.arange(keys.shape[2], device=keys.device)
        valid = (kpos[None, :] <= qpos[:, None]).view(1, 1, length, -1)
        out = self.attend(self, q, keys, values, valid, qpos, kpos)
        return self.o(out.transpose(1, 2).reshape(b, length, -1))


class TinyDecoder(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.embed = nn.Embedding(spec.vocab, spec.hidden)
        self.layers = nn.ModuleList(Layer(spec) for _ in range(spec.layers))
        self.head = nn.Linear(spec.hidden, spec.vocab)

    def forward(self, ids: Tensor, start: Tensor) -> Tensor:
        """``ids[B, L]`` at positions ``start, start+1, …`` (``start`` a 0-d tensor: no recompiles)."""
        qpos = start + torch.arange(ids.shape[1], device=ids.device)
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x, qpos)
        return self.head(x)


@dataclass(frozen=True)
class Spec:
    attend: Attend
    cache: str = "static"
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    hidden: int = 64
    layers: int = 2
    batch: int = 2
    max_len: int = 40
    vocab: int = 61
    dtype: torch.dtype = torch.float32
    normaliser: Callable[[], nn.Module] | None = None
    kind: str = "entmax15"  # what explain() should call the sites

    def build(self, seed: int = 0) -> TinyDecoder:
        torch.manual_seed(seed)
        return TinyDecoder(self).eval().to(self.dtype)


ZOO: dict[str, Spec] = {
    "hf_eager_entmax15": Spec(hf_eager_entmax15),
    "einsum_sparsemax": Spec(einsum_sparsemax, kv_heads=4, kind="sparsemax"),
    "bmm_entmax15_module": Spec(bmm_entmax15_module, kv_heads=4, normaliser=lambda: entmax.Entmax15(dim=-1)),
    "interleave_bisect_dynamic": Spec(interleave_bisect, cache="dynamic", kind="entmax_bisect"),
    "grouped_alibi_param_alpha": Spec(
        grouped_alibi_param_alpha,
        normaliser=learned_alpha_bisect,
        kind="entmax_bisect",
    ),
    "tile_project_entmax": Spec(tile_project_entmax, kind="entmax"),
    "handwritten_sort": Spec(handwritten_sort, kind="hand-written"),
    "handwritten_bisect": Spec(handwritten_bisect, kv_heads=4, kind="hand-written"),
    "entmax_op_bf16": Spec(entmax_op_bool_mask, dtype=torch.bfloat16, batch=1, kv_heads=1),
    "function_apply": Spec(function_apply, batch=1, kind="hand-written"),
}
