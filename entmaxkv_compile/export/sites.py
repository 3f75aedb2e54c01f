"""Find entmax attention sites in an exported ATen graph (stand-in until ``passes/`` has its matcher).

A site is ``entmax(scale · q @ kᵀ + bias) @ v`` anchored on ``torch.ops.entmaxkv.entmax``, with the
forms torch.export produces for ordinary model code: optional dtype casts around the entmax, scale as
a multiply or divide by a constant (or none, for pre-scaled queries), an optional additive bias, ``kᵀ``
as ``transpose(-2, -1)``, and GQA through ``repeat_kv`` (unsqueeze + expand + reshape) or
``repeat_interleave`` over the head dim, which is undone so the site reads the KV heads once.
:func:`find_sites` is the one call :mod:`entmaxkv_compile.export` makes; the compiler pass's matcher
replaces it once it can report the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from ..ops import entmax_op  # noqa: F401  (registers torch.ops.entmaxkv.entmax, the sites' anchor)

aten = torch.ops.aten
# the spellings torch.export (pre-dispatch ATen) gives `.float()`/`.to(dtype)` and `view`/`reshape`
_CASTS = (aten.to.dtype,)
_RESHAPES = (aten.reshape.default, aten.view.default)


@dataclass(frozen=True)
class AttentionSite:
    """``entmax(scale · q @ kᵀ + bias) @ v``: ``q[B, Hq, Lq, D]``, ``k[B, Hkv, S, D]``, ``v[B, Hkv, S, Dv]``.

    ``k`` and ``v`` are the KV-head tensors (any ``repeat_kv`` undone).
    """

    name: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    bias: fx.Node | None
    scale: float
    alpha: float
    output: fx.Node  # the ``p @ v`` node the static op replaces


def _call(node: object, *targets: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _skip_casts(node: fx.Node) -> fx.Node:
    while _call(node, *_CASTS):
        node = node.args[0]
    return node


def _kv_heads(node: fx.Node) -> fx.Node:
    """The tensor before ``repeat_kv`` / ``repeat_interleave(n, dim=1)``, else ``node`` itself."""
    if _call(node, *_RESHAPES) and _call(node.args[0], aten.expand.default):
        inner = node.args[0].args[0]
        if _call(inner, aten.unsqueeze.default) and inner.args[1] == 2:
            return inner.args[0]
    if _call(node, aten.repeat_interleave.self_int) and node.args[2:3] == (1,):
        return node.args[0]
    return node


def _scaled_qk(node: fx.Node) -> tuple[fx.Node, fx.Node, float] | None:
    """``(q, k, scale)`` when ``node`` is ``scale · q @ kᵀ`` (``k`` still repeated), else ``None``."""
    scale = 1.0
    node = _skip_casts(node)
    if _call(node, aten.mul.Tensor, aten.div.Tensor) and isinstance(node.args[1], (int, float)):
        c = float(node.args[1])
        scale = c if node.target is aten.mul.Tensor else 1.0 / c
        node = _skip_casts(node.args[0])
    if not _call(node, aten.matmul.default):
        return None
    q, kt = node.args
    if not (_call(kt, aten.transpose.int) and sorted(d % 4 for d in kt.args[1:]) == [2, 3]):
        return None
    return q, kt.args[0], scale


def _match(entmax: fx.Node, max_query_len: int) -> AttentionSite | str:
    x, alpha, dim = entmax.args
    if dim not in (-1, 3):
        return f"entmax over dim {dim}, not the key dim"
    x = _skip_casts(x)
    bias = None
    found = _scaled_qk(x)
    if found is None and _call(x, aten.add.Tensor):
        for scores, other in (x.args, x.args[::-1]):
            if isinstance(other, fx.Node) and (found := _scaled_qk(scores)) is not None:
                bias = other
                break
    if found is None:
        return f"entmax input {x.name} ({x.target}) is not scale · q @ kᵀ (+ bias)"
    q, k, scale = found
    users = [u for u in entmax.users if u.target is not aten._assert_tensor_metadata.default]
    while len(users) == 1 and _call(users[0], *_CASTS):
        users = list(users[0].users)
    if len(users) != 1 or not _call(users[0], aten.matmul.default):
        return "the probabilities feed something other than one p @ v"
    out = users[0]
    qv = q.meta["val"]
    if qv.dim() != 4 or qv.shape[-2] > max_query_len:
        return f"query shape {tuple(qv.shape)}: not a decode step of at most {max_query_len} positions"
    return AttentionSite(entmax.name, q, _kv_heads(k), _kv_heads(out.args[1]), bias, scale, float(alpha), out)


def find_sites(graph: fx.Graph, max_query_len: int = 1) -> tuple[list[AttentionSite], list[str]]:
    """Entmax attention sites of ``graph`` and, for each entmax node not matched, why."""
    sites, unmatched = [], []
    for node in graph.find_nodes(op="call_function", target=torch.ops.entmaxkv.entmax.default):
        found = _match(node, max_query_len)
        if isinstance(found, str):
            unmatched.append(f"{node.name}: {found}")
        else:
            sites.append(found)
    return sites, unmatched
