"""A small Llama-style decoder with entmax-1.5 attention: the real model behind the fidelity evaluation.

RMSNorm, SwiGLU, grouped-query attention (8 query heads over 2 KV heads, head dim 64), rotary position
embeddings, byte vocabulary (256). Attention is written the way model code usually is, so that
``torch.compile(model, backend="entmaxkv")`` meets the pattern it rewrites::

    scores = (q @ k.transpose(-2, -1)) * scale + mask      # additive mask, −inf = not attendable
    out = entmax(scores, alpha=1.5, dim=-1) @ v            # entmaxkv_compile.reference.entmax

Decoding uses static, preallocated per-layer caches written with ``index_copy_`` at ``input_pos``
(gpt-fast style), so a decode step has the same shapes every step. Training uses the same attention
with a closed-form entmax backward (saving only the probabilities, not the sort).

Why RoPE: it is what deployed decoders use, and it is the hard case for page bounds (rotations spread the
keys of a page over the box, DESIGN.md §2). The base is small (100) so that every rotary frequency turns
through at least one full period inside the 1K training window: no relative angle seen at 16K is new,
which is what lets the model keep working far beyond its training length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..reference.entmax import entmax

ALPHA = 1.5
# Attention scores materialised at once (fp32 elements); longer prefills are split into query chunks.
SCORE_CHUNK_ELEMS = 1 << 27

# decode_fn(q [B,Hq,1,D], k [B,Hkv,S,D], v [B,Hkv,S,D], scale, mask [1,S]) -> out [B,Hq,1,D]
DecodeFn = Callable[[Tensor, Tensor, Tensor, float, Tensor], Tensor]


@dataclass(frozen=True)
class LMConfig:
    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 2
    head_dim: int = 64
    ffn_dim: int = 768
    rope_base: float = 100.0
    rope_fraction: float = 1.0  # share of each head's frequency pairs that rotate (the fastest ones)
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")


class _Entmax15(torch.autograd.Function):
    """entmax-1.5 whose backward needs only ``p``: ``dx = √p·g − (Σ√p·g / Σ√p)·√p``."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        p = entmax(x, alpha=ALPHA, dim=-1)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:  # type: ignore[override]
        (p,) = ctx.saved_tensors
        u = p.sqrt()
        ug = u * g
        return ug - u * (ug.sum(-1, keepdim=True) / u.sum(-1, keepdim=True).clamp_min(1e-30))


def entmax15(scores: Tensor) -> Tensor:
    """entmax-1.5 over the last dim; a plain ``entmax`` call whenever no gradient is needed."""
    if torch.is_grad_enabled() and scores.requires_grad:
        return _Entmax15.apply(scores)
    return entmax(scores, alpha=ALPHA, dim=-1)


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Entmax attention ``[B, H, T, D]`` over keys ``[B, H, S, D]`` with an additive ``mask[T, S]``."""
    scores = (q @ k.transpose(-2, -1)) * scale + mask
    return entmax15(scores) @ v


def rope_angles(pos: Tensor, head_dim: int, base: float, fraction: float = 1.0) -> tuple[Tensor, Tensor]:
    """``cos, sin`` of shape ``[T, head_dim]`` for integer positions ``pos[T]``; only the fastest
    ``fraction`` of the frequency pairs rotate, the slowest ones are position-free (p-RoPE)."""
    inv_freq = base ** -(torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    inv_freq[round(fraction * inv_freq.numel()) :] = 0.0
    ang = pos.float()[:, None] * inv_freq
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """``[B, Hkv, S, D]`` → ``[B, Hkv·n_rep, S, D]`` (query head ``h`` reads KV head ``h // n_rep``)."""
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class KVCache(nn.Module):
    """Static cache ``[B, Hkv, max_len, D]``; ``update`` writes positions ``pos[T]`` in place."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, device: torch.device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device), persistent=False)

    def update(self, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.cache: KVCache | None = None
        self.decode_fn: DecodeFn | None = None

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, pos: Tensor | None, record: list | None
    ) -> Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if record is not None:
            record.append((q, k, v))
        if self.cache is not None and pos is not None:
            k, v = self.cache.update(pos, k, v)
        if self.decode_fn is not None and t == 1:
            out = self.decode_fn(q, k, v, self.scale, mask)
        else:
            out = self._attend(q, k, v, mask, pos)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, pos: Tensor | None) -> Tensor:
        rep = self.n_heads // self.n_kv_heads
        k, v = repeat_kv(k, rep), repeat_kv(v, rep)
        b, h, t, _ = q.shape
        chunk = max(1, SCORE_CHUNK_ELEMS // (b * h * k.shape[2]))
        if t <= chunk:
            return attention(q, k, v, mask, self.scale)
        outs = []
        for lo in range(
            0, t, chunk
        ):  # long prefill (eager): query chunks, keys up to the chunk's last position
            hi = min(t, lo + chunk)
            kv_end = hi if pos is None else int(pos[hi - 1]) + 1  # positions increase along a prefill
            m = mask[lo:hi, :kv_end]
            outs.append(attention(q[:, :, lo:hi], k[:, :, :kv_end], v[:, :, :kv_end], m, self.scale))
        return torch.cat(outs, dim=2)


class FeedForward(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FeedForward(cfg)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, pos: Tensor | None, record: list | None
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, pos, record)
        return x + self.ffn(self.ffn_norm(x))


class EntmaxLM(nn.Module):
    """Byte-level decoder. ``forward(tokens[B, T], input_pos[T] | None) -> logits[B, T, vocab]`` (fp32).

    Without ``input_pos`` (or without caches) the call is a causal forward over positions ``0..T−1``.
    After :meth:`setup_cache`, ``input_pos`` gives the absolute positions of ``tokens``; their K/V are
    written into the caches and attention runs over the whole cache with unwritten slots masked.
    """

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(self._init)
        self.max_len = 0

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def setup_cache(self, batch: int, max_len: int) -> None:
        """Allocate static fp32 K/V caches of ``max_len`` positions for ``batch`` sequences."""
        device = self.embed.weight.device
        for blk in self.layers:  # the layer's own head count: local heads once sharded by head
            blk.attn.cache = KVCache(batch, blk.attn.n_kv_heads, max_len, self.cfg.head_dim, device)
        self.max_len = max_len

    @property
    def attention_layers(self) -> list[Attention]:
        return [blk.attn for blk in self.layers]

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, record: list | None = None) -> Tensor:
        t = tokens.shape[1]
        device = tokens.device
        cached = input_pos is not None and self.layers[0].attn.cache is not None
        if cached:
            pos = input_pos
            slots = torch.arange(self.max_len, device=device)
            mask = torch.where(slots[None, :] <= pos[:, None], 0.0, float("-inf"))
        else:
            pos = torch.arange(t, device=device)
            mask = torch.full((t, t), float("-inf"), device=device).triu(1)
        cos, sin = rope_angles(pos, self.cfg.head_dim, self.cfg.rope_base, self.cfg.rope_fraction)
        x = self.embed(tokens)
        for blk in self.layers:
            x = blk(x, cos, sin, mask, input_pos if cached else None, record)
        return self.head(self.norm(x)).float()

    @torch.no_grad()
    def qkv(self, tokens: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per layer: ``(q[B, Hq, T, D], k[B, Hkv, T, D], v[B, Hkv, T, D])`` of a causal forward, post-RoPE
        (exactly what attention and a KV cache see)."""
        record: list[tuple[Tensor, Tensor, Tensor]] = []
        self(tokens, record=record)
        return record


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: EntmaxLM, path: str | Path, meta: dict) -> None:
    """fp16 state dict + config + ``meta`` (training facts) in one ``torch.save`` file."""
    state = {k: v.detach().to("cpu", torch.float16) for k, v in model.state_dict().items()}
    torch.save({"config": dataclasses.asdict(model.cfg), "state_dict": state, "meta": meta}, path)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[EntmaxLM, dict]:
    """The fp32 model (in eval mode) and the ``meta`` saved with it."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = EntmaxLM(LMConfig(**blob["config"]))
    model.load_state_dict({k: v.float() for k, v in blob["state_dict"].items()})
    return model.to(device).eval(), blob["meta"]
