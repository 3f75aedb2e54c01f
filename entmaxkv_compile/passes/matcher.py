"""Match entmax attention around an anchor node and describe it in canonical decode form.

Mental model
------------
Attention is ``P = normalise(scale · q·kᵀ + bias)`` followed by ``O = P·v``.  The matcher starts at
the normaliser (the anchor: an ``entmaxkv::entmax`` node, or ``softmax`` for the report) and walks

1. **back** from its input through the *score chain* — multiply/divide by a number (the scale),
   add/subtract a tensor (additive mask, ALiBi), ``masked_fill``/``where`` with a very negative fill
   (boolean masks), casts, relayouts, inactive dropout — to the score product ``M1`` (``@``,
   ``matmul``, ``bmm``, ``einsum``);
2. from each operand of ``M1`` back through pure relayouts (:func:`.nodes.trace_view`) to the base
   tensors ``q`` and ``k`` (projection output, RoPE output, cache buffer …);
3. **forward** from the normaliser output through casts, relayouts and inactive dropout to the
   value product ``M2 = P·v``, and from its other operand back to the base ``v``.

:mod:`.layout` interprets every relayout, so at ``M1`` each axis of the scores gets a role — ``kv``
(shared by ``q`` and ``k``: batch rows and KV heads), ``group`` (query heads sharing a KV head),
``query`` (Lq), ``key`` (S) — and at ``M2`` each axis of ``v`` is tied to one of them.  From the roles
we build the canonical ``q[B,Hq,Lq,D]``, ``k/v[B,Hkv,S,D]`` (un-repeated), the fp32 bias in
``[B|1, Hq|1, Lq|1, S|1]`` and the relayout that turns ``decode_attn``'s output back into ``M2``'s
layout.  Any step that cannot be interpreted raises :class:`.layout.Unsupported` with the reason:
the site stays dense.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from ..config import SUPPORTED_HEAD_DIMS, EntmaxKVConfig
from . import layout, nodes
from .layout import Atom, Chain, Dims, Unsupported, flat, numel
from .report import MatchedSite

# A fill value at or below this is "masked": no score that low is ever in an entmax support next to a
# real attention score, and code writes masks as -inf, finfo.min, -1e9 or -1e4.
MASK_FILL = -1e4
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(eq=False)
class Axis(Atom):
    """A semantic axis of the attention: its role and the q/k atoms it came from."""

    role: str = "kv"  # kv | group | query | key
    q: Atom | None = None
    k: Atom | None = None


@dataclass(frozen=True)
class Relayout:
    """``x.reshape(sizes).permute(perm)[.expand(expand)].reshape(shape)`` with static sizes."""

    sizes: tuple[int, ...]
    perm: tuple[int, ...]
    shape: tuple[int, ...]
    expand: tuple[int, ...] | None = None


@dataclass(frozen=True)
class BiasStep:
    """One operation on the additive bias, replayed in canonical layout: ``add``, ``mask`` or ``scale``."""

    op: str
    value: float = 1.0  # scale factor / sign of an added term
    tensor: fx.Node | None = None
    relayout: Relayout | None = None
    masked_when: bool = True  # for "mask": which value of the boolean marks masked positions


@dataclass
class Site:
    """Everything the rewrite needs for one matched attention site."""

    info: MatchedSite
    product: fx.Node
    q: fx.Node
    k: fx.Node
    v: fx.Node
    q_plan: Relayout
    k_plan: Relayout
    v_plan: Relayout
    out_plan: Relayout
    scale: float
    alpha: float
    bias: list[BiasStep] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- products


def _product(node: fx.Node) -> tuple[list[fx.Node], list[str], str]:
    """Operands of a product and an einsum-style description of it."""
    if nodes.kind(node) == "einsum":
        eq, *ops = node.args
        if len(ops) == 1 and isinstance(ops[0], list | tuple):
            ops = list(ops[0])
        eq = eq.replace(" ", "")
        if "->" not in eq or "." in eq or len(ops) != 2:
            raise Unsupported(f"einsum {eq!r} is not a two-operand explicit product")
        ins, out = eq.split("->")
        letters = ins.split(",")
    else:
        ops = [node.args[0], node.args[1]]
        if not all(isinstance(o, fx.Node) and nodes.is_tensor(o) for o in ops):
            raise Unsupported("a product operand is not a tensor")
        na, nb = (len(nodes.shape(o)) for o in ops)
        if na < 2 or nb < 2:
            raise Unsupported("a product operand has fewer than 2 dimensions")
        nbat = max(na, nb) - 2
        batch = "abcdefgh"[:nbat]
        letters = [batch[nbat - (na - 2) :] + "xy", batch[nbat - (nb - 2) :] + "yz"]
        out = batch + "xz"
    if not all(isinstance(o, fx.Node) and nodes.is_tensor(o) for o in ops):
        raise Unsupported("a product operand is not a tensor")
    for lt, o in zip(letters, ops):
        if len(set(lt)) != len(lt) or len(lt) != len(nodes.shape(o)):
            raise Unsupported("product with repeated or mismatched subscripts")
    return ops, letters, out


def _trace(node: fx.Node) -> tuple[fx.Node, Chain]:
    base, ops = nodes.trace_view(node)
    return base, nodes.follow(Chain(nodes.shape(base)), ops)


def _pair_scores(letters: list[str], out: str, qc: Chain, kc: Chain) -> tuple[Dims, list[tuple[Atom, Atom]]]:
    """Roles of the score product's axes: the scores' layout and the contracted (q, k) atom pairs."""
    la, lb = letters
    qd, kd = dict(zip(la, qc.dims)), dict(zip(lb, kc.dims))
    q_only = [c for c in la if c not in lb and c in out]
    if any(c not in out and not (c in la and c in lb) for c in la + lb):
        raise Unsupported("the score product sums over a non-shared axis")

    def data(a: Atom | None) -> bool:
        return a is not None and not a.broadcast

    dims: list[tuple[Axis, ...]] = []
    for c in out:
        if c in la and c in lb:
            axes = []
            for qa, ka in layout.pair(qd[c], kd[c], qc.split, kc.split):
                if not data(qa):
                    raise Unsupported("the query is broadcast over key heads")
                kv = data(ka)
                axes.append(Axis(qa.size, role="kv" if kv else "group", q=qa, k=ka if kv else None))
            dims.append(tuple(axes))
        elif c in la:
            if not all(map(data, qd[c])):
                raise Unsupported("the query is broadcast along its own axis")
            role = "query" if c == q_only[-1] else "group"
            dims.append(tuple(Axis(a.size, role=role, q=a) for a in qd[c]))
        elif c in lb:
            if not all(map(data, kd[c])):
                raise Unsupported("the keys are broadcast along the key axis")
            dims.append(tuple(Axis(a.size, role="key", k=a) for a in kd[c]))
        else:
            raise Unsupported("product output axis not in its inputs")
    d_pairs: list[tuple[Atom, Atom]] = []
    for c in la:
        if c in lb and c not in out:
            for qa, ka in layout.pair(qd[c], kd[c], qc.split, kc.split):
                if not (data(qa) and data(ka)):
                    raise Unsupported("the head dimension is broadcast")
                d_pairs.append((qa, ka))
    return tuple(dims), d_pairs


def _pair_values(letters: list[str], out: str, p_dims: Dims, vc: Chain) -> tuple[Dims, dict[int, Atom]]:
    """Tie each axis of ``v`` to a score axis; returns the output layout and ``id(Axis) -> v atom``."""
    lp, lv = letters
    pd, vd = dict(zip(lp, p_dims)), dict(zip(lv, vc.dims))
    v_of: dict[int, Atom] = {}
    dims: list[tuple[Atom, ...]] = []
    for c in out:
        if c in lp and c in lv:
            axes = []
            for ax, va in layout.pair(pd[c], vd[c], layout.no_split, vc.split):
                has_v = va is not None and not va.broadcast
                if not isinstance(ax, Axis):
                    raise Unsupported("the values have an axis the probabilities lack")
                if ax.role == "kv" and has_v:
                    v_of[id(ax)] = va
                elif ax.role == "kv" or has_v:
                    raise Unsupported("values and keys are not shared the same way across heads")
                axes.append(ax)
            dims.append(tuple(axes))
        elif c in lp:
            if any(ax.role == "key" for ax in pd[c]):
                raise Unsupported("the value product keeps the key axis")
            dims.append(pd[c])
        elif c in lv:
            if any(a.broadcast for a in vd[c]):
                raise Unsupported("the values are broadcast along the head dimension")
            dims.append(vd[c])
        else:
            raise Unsupported("product output axis not in its inputs")
    for c in lp:
        if c in out:
            continue
        if c not in lv:
            raise Unsupported("the value product sums the probabilities over an axis")
        for ax, va in layout.pair(pd[c], vd[c], layout.no_split, vc.split):
            if not isinstance(ax, Axis) or ax.role != "key" or va is None or va.broadcast:
                raise Unsupported("the value product does not contract over the key axis")
            v_of[id(ax)] = va
    return tuple(dims), v_of


# ----------------------------------------------------------------------------------------------- relayouts


def _static(values: list[Any], what: str) -> tuple[int, ...]:
    """Sizes for an emitted reshape: SymInts become -1 (at most one)."""
    out = tuple(v if isinstance(v, int) else -1 for v in values)
    if out.count(-1) > 1:
        raise Unsupported(f"{what} has more than one dynamic dimension")
    return out


def _relayout(src: list[Atom], groups: list[list[Atom]], what: str) -> Relayout:
    """Reshape a tensor whose atoms are ``src`` (row-major) into one dimension per group."""
    order = flat(groups)
    index = {id(a): i for i, a in enumerate(src)}
    if len(order) != len(src) or any(id(a) not in index for a in order):
        raise Unsupported(f"the {what} has an axis the attention does not use")
    return Relayout(
        sizes=_static([a.size for a in src], what),
        perm=tuple(index[id(a)] for a in order),
        shape=_static([numel(g) for g in groups], what),
    )


def _side_relayout(t_shape: tuple, dims: Dims, groups: list[list[Atom]], what: str) -> Relayout:
    """Relayout of a mask/bias broadcasting against ``dims`` into the canonical 4-D form."""
    lead = len(dims) - len(t_shape)
    if lead < 0:
        raise Unsupported(f"the {what} has more dimensions than the scores")
    sizes: list[Any] = []
    present: set[int] = set()
    for i, d in enumerate(dims):
        ts = t_shape[i - lead] if i >= lead else 1
        if layout.is_one(ts):
            sizes += [1] * len(d)
        elif d and layout.same(ts, numel(d)):
            sizes += [a.size for a in d]
            present.update(id(a) for a in d)
        else:
            raise Unsupported(f"the {what} does not broadcast along whole attention axes")
    src = flat(dims)
    index = {id(a): i for i, a in enumerate(src)}
    order = flat(groups)
    expand, shape = [], []
    for g in groups:
        have = [id(a) in present for a in g]
        mixed = any(have) and not all(have)
        expand += [a.size if mixed and not h else -1 for a, h in zip(g, have)]
        shape.append(numel(g) if any(have) else 1)
    return Relayout(
        sizes=_static(sizes, what),
        perm=tuple(index[id(a)] for a in order),
        shape=_static(shape, what),
        expand=_static(expand, what) if any(e != -1 for e in expand) else None,
    )


# ----------------------------------------------------------------------------------------------- chains


def _fill_value(x: Any, constant: nodes.ConstantFn) -> float | None:
    value = constant(x)
    if value is None or value.numel() == 0 or not bool((value == value.flatten()[0]).all()):
        return None
    return float(value.flatten()[0])


def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else None


def _score_path(x: fx.Node, depth: int = 0) -> tuple[fx.Node, list[tuple[fx.Node, int]]]:
    """From the normaliser input back to the score product: ``(M1, [(node, score operand index)])``."""
    k = nodes.kind(x)
    if k in nodes.PRODUCT_KINDS:
        return x, []
    if depth > 48:
        raise Unsupported("no score product within reach of the normaliser")
    if nodes.view_fn(x) is not None or nodes.is_inactive_dropout(x):
        candidates = [0]
    elif k in ("mul", "add"):
        candidates = [0, 1]
    elif k in ("div", "sub", "masked_fill"):
        candidates = [0]
    elif k == "where":
        candidates = [1, 2]
    else:
        what = x.target if x.op != "call_function" else getattr(x.target, "__name__", x.target)
        raise Unsupported(f"{what} between the score product and the normaliser is not understood")
    error = Unsupported("no score product within reach of the normaliser")
    for i in candidates:
        a = x.args[i] if i < len(x.args) else None
        if not isinstance(a, fx.Node) or not nodes.is_tensor(a):
            continue
        try:
            m1, path = _score_path(a, depth + 1)
        except Unsupported as e:
            error = e
            continue
        return m1, [*path, (x, i)]
    raise error


def _depends_on(node: Any, target: fx.Node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _check_not_mutated(chain: list[fx.Node]) -> None:
    for n in chain:
        if any(not nodes.is_pure(u) and u.args and u.args[0] is n for u in n.users):
            raise Unsupported("the scores or probabilities are modified in place")


def _to_value_product(p: fx.Node, dims: Dims, depth: int = 0) -> tuple[fx.Node, Dims, list[fx.Node]]:
    """From the normaliser output forward to ``P @ v``: ``(M2, P's layout there, nodes on the way)``."""
    for u in p.users:
        if nodes.kind(u) in nodes.PRODUCT_KINDS:
            ops, _, _ = _product(u)
            if ops[0] is p:
                return u, dims, []
    if depth < 16:
        for u in p.users:
            if u.args and u.args[0] is p and (nodes.view_fn(u) or nodes.is_inactive_dropout(u)):
                step = nodes.view_fn(u)
                try:
                    m2, d, path = _to_value_product(
                        u, step(dims, layout.no_split) if step else dims, depth + 1
                    )
                except Unsupported:
                    continue
                return m2, d, [u, *path]
    raise Unsupported("the normaliser output does not reach a P @ v product")


# ----------------------------------------------------------------------------------------------- matching


def match(
    anchor: fx.Node, alpha: float | None, config: EntmaxKVConfig, constant: nodes.ConstantFn, kind: str
) -> Site:
    """Match the attention around ``anchor`` (input = scores, ``dim`` = key axis); raises Unsupported.

    ``alpha=None`` matches the structure only (softmax sites, for the report).
    """
    x = anchor.args[0]
    dim = nodes.arg(anchor, 2 if alpha is not None else 1, "dim")
    if not isinstance(x, fx.Node) or not isinstance(dim, int):
        raise Unsupported("the normaliser's input or dim is not static")
    m1, path = _score_path(x)
    (qn, kn), letters, out = _product(m1)
    q, qc = _trace(qn)
    k, kc = _trace(kn)
    dims, d_pairs = _pair_scores(letters, out, qc, kc)
    axes = flat(dims)
    batch, kv_heads = _split_batch([a for a in axes if a.role == "kv"], kc)
    group, query, key = ([a for a in axes if a.role == r] for r in ("group", "query", "key"))
    rows = [batch, kv_heads + group, query]  # canonical [B, Hq, Lq] groups of scores and output
    canon = [*rows, key]

    scale, bias = 1.0, []
    _check_not_mutated([m1] + [n for n, _ in path])
    for node, i in path:
        dims, scale = _replay(node, i, dims, canon, scale, bias, m1, constant)
    if not key or set(map(id, dims[dim % len(dims)])) != set(map(id, key)):
        raise Unsupported("the normaliser is not taken over the key axis")

    m2, p_dims, p_path = _to_value_product(anchor, dims)
    _check_not_mutated([anchor, *p_path])
    (_, vn), v_letters, v_out = _product(m2)
    v, vc = _trace(vn)
    out_dims, v_of = _pair_values(v_letters, v_out, p_dims, vc)
    dv = [a for a in flat(out_dims) if not isinstance(a, Axis)]

    if any(id(a) not in v_of for a in batch + kv_heads + key):
        raise Unsupported("the values do not follow the keys' head and key axes")
    kv_rows = [batch, kv_heads, key]
    q_plan = _relayout(qc.base_atoms(), [*_pick(rows, lambda a: a.q), [p[0] for p in d_pairs]], "query")
    k_plan = _relayout(kc.base_atoms(), [*_pick(kv_rows, lambda a: a.k), [p[1] for p in d_pairs]], "key")
    v_plan = _relayout(vc.base_atoms(), [*_pick(kv_rows, lambda a: v_of[id(a)]), dv], "value")
    out_plan = _relayout(flat(rows) + dv, [list(d) for d in out_dims], "output")

    lq = numel(query)
    if not isinstance(lq, int) or lq > config.max_query_len:
        raise Unsupported(f"query length {lq} > max_query_len={config.max_query_len} (prefill stays dense)")
    if alpha is not None and not 1.0 < alpha <= 2.0:
        raise Unsupported(f"alpha={alpha:g} is outside (1, 2]")
    if not (math.isfinite(scale) and scale > 0):
        raise Unsupported(f"score scale {scale:g} is not a positive number")
    d = numel([p[0] for p in d_pairs])
    if config.policy in ("certified", "auto") and not (isinstance(d, int) and d % config.group_size(d) == 0):
        group = config.group_size(d)
        raise Unsupported(f"head dim {d} is not a multiple of sketch_group={group} (certified)")
    _check_tensors(q, k, v, d, numel(dv))
    _check_no_mutation_between(m1, m2, (q, k, v))
    alpha = 1.0 if alpha is None else alpha
    info = MatchedSite(
        kind=kind,
        alpha=alpha,
        num_heads=numel(rows[1]),
        num_kv_heads=numel(kv_heads),
        query_len=lq,
        where=nodes.where(anchor),
    )
    return Site(info, m2, q, k, v, q_plan, k_plan, v_plan, out_plan, scale, alpha, bias)


def _pick(groups: list[list[Axis]], atom: Callable[[Axis], Atom]) -> list[list[Atom]]:
    return [[atom(a) for a in g] for g in groups]


def _split_batch(kv: list[Axis], kc: Chain) -> tuple[list[Axis], list[Axis]]:
    """Split the shared axes into batch rows and KV heads: rows are the key base's leading axis."""
    axis_of = {id(a): i for i, d in enumerate(kc.base) for a in d}
    origin = [axis_of.get(id(a.k), -1) for a in kv]
    if len(set(origin)) > 1:
        first = min(origin)
        return [a for a, o in zip(kv, origin) if o == first], [a for a, o in zip(kv, origin) if o != first]
    if len(kv) > 1:
        return kv[:1], kv[1:]
    if kv and origin[0] == 0 and len(kc.base) >= 4:
        return kv, []
    return [], kv


def _replay(
    node: fx.Node,
    i: int,
    dims: Dims,
    canon: list[list[Atom]],
    scale: float,
    bias: list[BiasStep],
    m1: fx.Node,
    constant: nodes.ConstantFn,
) -> tuple[Dims, float]:
    """Apply one score-chain node: update the scores' layout, the scale and the bias steps."""
    step = nodes.view_fn(node)
    if step is not None:
        return step(dims, layout.no_split), scale
    k = nodes.kind(node)
    if k == "dropout":
        return dims, scale
    other = node.args[1 - i] if k in ("mul", "add", "div", "sub") else None
    if k in ("add", "sub") and node.kwargs.get("alpha", 1) != 1:
        raise Unsupported("add/sub with alpha= is not understood")
    if k in ("mul", "div"):
        c = _number(other)
        if c is None or c == 0:
            raise Unsupported(f"the scores are scaled by a tensor ({other}), not a number")
        c = c if k == "mul" else 1.0 / c
        bias.append(BiasStep("scale", value=c))
        return dims, scale * c
    if k in ("add", "sub"):
        if _number(other) is not None:  # a constant shift: entmax and softmax are shift-invariant
            return dims, scale
        if k == "sub" and i == 1:
            raise Unsupported("the scores are negated")
        plan = _side_relayout(nodes.shape(other), dims, canon, "bias")
        if _depends_on(other, m1):  # x - max(x): a per-row shift, invisible to the normaliser
            if plan.shape[3] != 1:
                raise Unsupported("a term added to the scores depends on the scores")
            return dims, scale
        bias.append(BiasStep("add", value=1.0 if k == "add" else -1.0, tensor=other, relayout=plan))
        return dims, scale
    if k == "masked_fill":
        mask, fill = nodes.arg(node, 1, "mask"), nodes.arg(node, 2, "value")
        masked_when = True
    else:  # where(cond, scores, fill) or where(cond, fill, scores)
        mask, fill = node.args[0], node.args[2 if i == 1 else 1]
        masked_when = i == 2
    value = _fill_value(fill, constant)
    if value is None or value > MASK_FILL:
        raise Unsupported(f"scores are filled with {value if value is not None else fill}, not a mask value")
    if not isinstance(mask, fx.Node) or _depends_on(mask, m1):
        raise Unsupported("the mask depends on the scores")
    plan = _side_relayout(nodes.shape(mask), dims, canon, "mask")
    bias.append(BiasStep("mask", tensor=mask, relayout=plan, masked_when=masked_when))
    return dims, scale


def _check_tensors(q: fx.Node, k: fx.Node, v: fx.Node, d: Any, dv: Any) -> None:
    tq, tk, tv = (nodes.val(n) for n in (q, k, v))
    if not (tq.dtype == tk.dtype == tv.dtype):
        raise Unsupported(f"q/k/v dtypes differ ({tq.dtype}, {tk.dtype}, {tv.dtype})")
    if tq.dtype not in _DTYPES:
        raise Unsupported(f"dtype {tq.dtype} is not supported (fp32/fp16/bf16)")
    if not (tq.device == tk.device == tv.device):
        raise Unsupported("q/k/v live on different devices")
    if tq.device.type == "cuda" and (d not in SUPPORTED_HEAD_DIMS or dv != d):
        raise Unsupported(f"head dim {d}/{dv} is not supported by the CUDA kernels {SUPPORTED_HEAD_DIMS}")
    if tq.device.type not in ("cpu", "cuda"):
        raise Unsupported(f"device {tq.device} is not supported")


def _check_no_mutation_between(m1: fx.Node, m2: fx.Node, bases: tuple[fx.Node, ...]) -> None:
    """The rewrite reads q/k/v where ``M2`` is; nothing may write them between ``M1`` and ``M2``."""
    order = {n: i for i, n in enumerate(m1.graph.nodes)}
    lo, hi = order[m1], order[m2]
    for b in bases:
        for u in b.users:
            if not nodes.is_pure(u) and u.args and u.args[0] is b and lo < order[u] < hi:
                raise Unsupported(f"{b.name} is modified inside the attention")
