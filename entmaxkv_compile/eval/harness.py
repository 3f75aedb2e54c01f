"""Measurements on the trained model: attention fidelity per policy, decode bits per byte, passkey.

* :func:`context_bpb`: dense bits per byte of validation windows of several lengths (overall and over
  the last ``tail`` bytes), i.e. whether the model still works at a context length.
* :func:`fidelity`: real ``q/K/V`` of every layer at chosen decode positions; each policy decodes every
  (window, head) and is compared with dense entmax on the same bf16 cache.
* :func:`decode_bpb`: a dense prefill, then ``steps`` teacher-forced decode steps with the policy in every
  layer (its errors compound through the layers and the cache, as in serving).
* :func:`passkey`: the same decode path over the tail of passkey prompts; a trial counts if every digit
  of the key is the argmax.

The KV cache is stored in fp32 by the model; policies see it cast to ``kv_dtype`` (bf16 by default, as
served), so byte fractions are relative to a bf16 K/V cache. Queries stay fp32.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.corpus import passkey_sequence
from ..models.llama_entmax import ALPHA, DecodeFn, EntmaxLM
from ..reference.decode import DecodeStats, dense_decode
from .policies import Policy

LN2 = math.log(2.0)
# fields of DecodeStats summarised per policy and layer, and which direction is worse
ROW_FIELDS = {"support_recall": "min", "dropped_mass": "max", "delta_bound": "max", "output_error": "max"}
GROUP_FIELDS = {"kv_bytes_fraction": "max", "read_fraction": "max", "certified": "min", "fallback": "max"}


def take_windows(text: np.ndarray, length: int, n: int, device: torch.device | str) -> Tensor:
    """``n`` windows of ``length`` bytes at evenly spaced offsets of ``text`` (``int64 [n, length]``)."""
    if len(text) < length:
        raise ValueError(f"validation text has {len(text)} bytes, fewer than one window of {length}")
    starts = np.linspace(0, len(text) - length, n).astype(np.int64)
    return torch.from_numpy(np.stack([text[s : s + length] for s in starts]).astype(np.int64)).to(device)


@torch.no_grad()
def context_bpb(
    model: EntmaxLM, text: np.ndarray, contexts: Sequence[int], n_windows: int, tail: int
) -> list:
    """Dense bits per byte at each context length: over the window and over its last ``tail`` bytes."""
    device = model.embed.weight.device
    rows = []
    for n in contexts:
        w = take_windows(text, n + 1, n_windows, device)
        ce = F.cross_entropy(model(w[:, :-1]).transpose(1, 2), w[:, 1:], reduction="none")
        rows.append(
            {
                "context": n,
                "bpb": ce.mean().item() / LN2,
                "bpb_tail": ce[:, -min(tail, n) :].mean().item() / LN2,
            }
        )
    return rows


class Tally:
    """Per-layer collections of DecodeStats values, summarised as mean and worst case."""

    def __init__(self, n_layers: int) -> None:
        self.layers: list[dict[str, list[Tensor]]] = [defaultdict(list) for _ in range(n_layers)]

    def add(self, layer: int, st: DecodeStats, n_tokens: int) -> None:
        vals = self.layers[layer]
        for f in ROW_FIELDS:
            x = getattr(st, f)
            if x is not None:
                vals[f].append(x.flatten().float().cpu())
        vals["kv_bytes_fraction"].append(st.kv_bytes_fraction.flatten().float().cpu())
        vals["read_fraction"].append((st.tokens_read / n_tokens).flatten().float().cpu())
        vals["candidate_fraction"].append((st.candidates / n_tokens).flatten().float().cpu())
        vals["certified"].append(st.certified.flatten().float().cpu())
        vals["fallback"].append(st.fallback.flatten().float().cpu())

    @staticmethod
    def _summary(vals: dict[str, list[Tensor]]) -> dict[str, float]:
        worst = {**ROW_FIELDS, **GROUP_FIELDS, "candidate_fraction": "max"}
        out = {}
        for f, chunks in vals.items():
            x = torch.cat(chunks)
            out[f] = x.mean().item()
            out[f + "_worst"] = (x.min() if worst[f] == "min" else x.max()).item()
        return out

    def summary(self) -> dict:
        merged: dict[str, list[Tensor]] = defaultdict(list)
        for vals in self.layers:
            for f, chunks in vals.items():
                merged[f].extend(chunks)
        return {"overall": self._summary(merged), "layers": [self._summary(v) for v in self.layers]}


@torch.no_grad()
def fidelity(
    model: EntmaxLM,
    windows: Tensor,
    positions: Sequence[int],
    policies: Sequence[Policy],
    kv_dtype: torch.dtype,
) -> dict:
    """Every policy on real ``q/K/V`` of every layer at the decode ``positions`` of ``windows[B, N]``."""
    layers = model.qkv(windows)
    scale = model.cfg.head_dim**-0.5
    tallies = {p.name: Tally(len(layers)) for p in policies}
    for li, (q, k, v) in enumerate(layers):
        k, v = k.to(kv_dtype), v.to(kv_dtype)
        for t in positions:
            qt, kt, vt = q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1]
            dense = dense_decode(qt, kt, vt, scale=scale, alpha=ALPHA)
            for p in policies:
                tallies[p.name].add(li, p.run(qt, kt, vt, scale, dense)[1], t + 1)
    return {
        p.name: {"family": p.family, "settings": p.settings, **tallies[p.name].summary()} for p in policies
    }


def policy_hook(policy: Policy, kv_dtype: torch.dtype, bytes_log: list[float]) -> DecodeFn:
    """A model ``decode_fn`` that runs ``policy`` on the cache's written prefix (cast to ``kv_dtype``)."""

    def decode_fn(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor) -> Tensor:
        n = int(torch.isfinite(mask[-1]).sum())  # written slots form a prefix of the static cache
        out, st = policy.run(q, k[:, :, :n].to(kv_dtype), v[:, :, :n].to(kv_dtype), scale, None)
        bytes_log.append(st.kv_bytes_fraction.mean().item())
        return out.to(q.dtype)

    decode_fn.__name__ = f"decode_{policy.name.replace(' ', '_')}"
    return decode_fn


def _decode_logits(
    model: EntmaxLM, tokens: Tensor, start: int, stop: int, policy: Policy, kv_dtype: torch.dtype
) -> tuple[Tensor, float]:
    """Decode ``tokens[:, start:stop]`` one at a time through ``policy`` (cache holds ``< start``):
    logits ``[B, stop − start, V]`` and the mean KV byte fraction of the steps."""
    bytes_log: list[float] = []
    for a in model.attention_layers:
        a.decode_fn = policy_hook(policy, kv_dtype, bytes_log)
    try:
        logits = [
            model(tokens[:, i : i + 1], input_pos=torch.tensor([i], device=tokens.device))
            for i in range(start, stop)
        ]
    finally:
        for a in model.attention_layers:
            a.decode_fn = None
    return torch.cat(logits, dim=1), float(np.mean(bytes_log))


def _prefill(model: EntmaxLM, tokens: Tensor, start: int) -> None:
    model.setup_cache(tokens.shape[0], tokens.shape[1])
    model(tokens[:, :start], input_pos=torch.arange(start, device=tokens.device))


@torch.no_grad()
def decode_bpb(
    model: EntmaxLM, windows: Tensor, steps: int, policies: Sequence[Policy], kv_dtype: torch.dtype
) -> dict:
    """Bits per byte of the last ``steps`` predictions of ``windows[B, N+1]``, decoded through each policy."""
    n = windows.shape[1] - 1
    _prefill(model, windows, n - steps)
    out = {}
    for p in policies:
        logits, kv_bytes = _decode_logits(model, windows, n - steps, n, p, kv_dtype)
        ce = F.cross_entropy(logits.transpose(1, 2), windows[:, n - steps + 1 :])
        out[p.name] = {"bpb": ce.item() / LN2, "kv_bytes_fraction": kv_bytes}
    dense = out["dense"]["bpb"]
    for r in out.values():
        r["rel_to_dense"] = r["bpb"] / dense - 1
    return out


@torch.no_grad()
def passkey(
    model: EntmaxLM,
    text: np.ndarray,
    lengths: Sequence[int],
    trials: int,
    policies_at: Callable[[int], Sequence[Policy]],
    kv_dtype: torch.dtype,
    seed: int,
    tail: int = 16,
) -> dict:
    """Passkey accuracy per policy and prompt length; needles at evenly spread depths, the last ``tail``
    tokens (question and answer) decoded through the policies ``policies_at(length)`` (budgets follow
    the length) after a dense prefill."""
    device = model.embed.weight.device
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for length in lengths:
        policies = policies_at(length)
        pks = [passkey_sequence(text, length, rng, depth=(i + 0.5) / trials) for i in range(trials)]
        tokens = torch.from_numpy(np.stack([pk.tokens for pk in pks]).astype(np.int64)).to(device)
        answer = torch.from_numpy(pks[0].answer).to(device)  # same positions for every trial
        start = length - tail
        _prefill(model, tokens, start)
        for p in policies:
            logits, _ = _decode_logits(model, tokens, start, length - 1, p, kv_dtype)
            pred = logits.argmax(-1)[:, answer - 1 - start]  # logits at i predict token i + 1
            out[p.name][str(length)] = (pred == tokens[:, answer]).all(-1).float().mean().item()
    return dict(out)
