"""A small entmax-attention decoder (one decode step) to export, test and demonstrate the static path.

Ordinary PyTorch in the style of Llama-like decoders: GQA through ``repeat_kv`` (expand + reshape), a
static KV cache written functionally with ``index_copy``, an additive mask (−inf = hidden), fp32
scores, and the project's entmax op. Nothing in it knows about the static-budget rewrite.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops import entmax_op  # noqa: F401  (registers torch.ops.entmaxkv.entmax)


def repeat_kv(x: Tensor, n: int) -> Tensor:
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.weight


class EntmaxBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, alpha: float) -> None:
        super().__init__()
        self.h, self.hkv, self.d, self.alpha = n_heads, n_kv_heads, dim // n_heads, alpha
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.q = nn.Linear(dim, n_heads * self.d, bias=False)
        self.kv = nn.Linear(dim, 2 * n_kv_heads * self.d, bias=False)
        self.o = nn.Linear(n_heads * self.d, dim, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim, bias=False), nn.SiLU(), nn.Linear(2 * dim, dim, bias=False)
        )

    def forward(self, x: Tensor, pos: Tensor, mask: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        b, g = x.shape[0], self.h // self.hkv
        h = self.norm1(x)
        q = self.q(h).view(b, 1, self.h, self.d).transpose(1, 2)
        k, v = self.kv(h).view(b, 1, 2 * self.hkv, self.d).transpose(1, 2).chunk(2, dim=1)
        keys, values = k_cache.index_copy(2, pos, k), v_cache.index_copy(2, pos, v)
        scores = q @ repeat_kv(keys, g).transpose(-2, -1) / math.sqrt(self.d) + mask
        probs = torch.ops.entmaxkv.entmax(scores.float(), self.alpha, -1).to(q.dtype)
        x = x + self.o((probs @ repeat_kv(values, g)).transpose(1, 2).reshape(b, 1, -1))
        return x + self.mlp(self.norm2(x))


class TinyEntmaxDecoder(nn.Module):
    """Decode step ``(ids[B, 1], pos[1], mask[B, 1, 1, S], k_cache, v_cache) → logits[B, 1, V]``.

    The caches are ``[L, B, Hkv, S, D]``; the step writes its key and value at ``pos`` (functionally).
    """

    def __init__(
        self,
        vocab: int = 128,
        dim: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        n_kv_heads: int = 2,
        alpha: float = 1.5,
    ) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(EntmaxBlock(dim, n_heads, n_kv_heads, alpha) for _ in range(n_layers))
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: Tensor, pos: Tensor, mask: Tensor, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        x = self.emb(ids)
        for i, block in enumerate(self.blocks):
            x = block(x, pos, mask, k_cache[i], v_cache[i])
        return self.head(self.norm(x))


def example_inputs(
    model: TinyEntmaxDecoder, batch: int = 2, cache_len: int = 256, seed: int = 0
) -> tuple[Tensor, ...]:
    """Decode inputs for ``model`` at its parameters' dtype: a random cache, a left-padded batch.

    Every row writes its new token at ``pos = cache_len − 2`` (the last slot stays unwritten and masked);
    row ``i`` is left-padded by ``37·i`` masked positions, so the rows see different token sets.
    """
    gen = torch.Generator().manual_seed(seed)
    block = model.blocks[0]
    dtype = model.head.weight.dtype
    cache_shape = (len(model.blocks), batch, block.hkv, cache_len, block.d)
    k_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    v_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    ids = torch.randint(0, model.emb.num_embeddings, (batch, 1), generator=gen)
    pos = cache_len - 2
    mask = torch.zeros(batch, 1, 1, cache_len, dtype=dtype)
    mask[..., pos + 1 :] = -math.inf
    for i in range(batch):
        mask[i, ..., : 37 * i] = -math.inf
    return ids, torch.tensor([pos]), mask, k_cache, v_cache
