"""Recognise α-entmax written out in plain ops and fold it into one ``entmaxkv::entmax`` node.

Hand-written entmax (sort + cumsum + threshold, or a bisection loop), and package calls Dynamo inlined
because they bypassed the polyfills (``Entmax15Function.apply`` called directly), reach the graph as
tens to hundreds of nodes.  Their spellings are endless, so we do not pattern-match them; we *test*
them:

1. Anchor on a value product ``M2 = P @ v`` whose ``P`` (through casts/relayouts/inactive dropout) is
   computed by something unknown, and find the nearest product ``M1`` above ``P`` (the scores).
2. Between ``M1`` and ``P``, the candidate inputs ``X`` of the normaliser are the nodes every path
   ``M1 → P`` passes through (cut vertices), tried from the closest to ``P`` back.  The *region*
   ``X → P`` must be a pure function of ``X`` (other inputs: literals, parameters, buffers).
3. Run the region on random probes of ``X``'s shape (real tensors, no graph input involved), find
   the axis along which the output sums to 1, fit α from the output (on the support
   ``p^(α−1)/(α−1) − x`` is constant), and accept only if the project's reference entmax with that α
   reproduces the output to within the dtype's tolerance.

Accepted regions are replaced by ``entmaxkv::entmax(X, α, dim)`` (kind ``hand-written``); the
attention matcher then treats them like any other entmax.  A normalised region that is not entmax
(hand-written softmax, sigmoid attention …) is reported and left alone.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, fx

from ..reference.entmax import _shifted_threshold, entmax_probs
from ..reference.entmax import entmax as reference_entmax
from . import nodes
from .rewrite import Emitter, erase_dead

log = logging.getLogger("entmaxkv_compile")

_MAX_PROBE = 1 << 22  # elements; larger normaliser inputs are prefill-sized and never rewritten
_FOLD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_REGION = 4096  # nodes; an unrolled 50-step bisection is ~400
_TOL = {torch.float32: 1e-4, torch.float64: 1e-6}
_HALF_TOL = 2e-2
_ALPHA_FLOOR = 1.05  # smallest α the fit searches; a fit there is not trusted (bf16 softmax-like regions)
_SPREADS = (8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1)  # standard deviations of the probes


def canonicalize(gm: fx.GraphModule, constant: nodes.Constants) -> list[tuple[fx.Node, str, str]]:
    """Fold every verified entmax region into one node; returns ``(node, kind, reason)`` of those left."""
    rejected: list[tuple[fx.Node, str, str]] = []
    for m2 in [n for n in gm.graph.nodes if nodes.kind(n) in nodes.PRODUCT_KINDS]:
        if m2.graph is not gm.graph or not m2.args:
            continue  # erased by an earlier fold
        p = _probabilities(m2)
        if p is None:
            continue
        m1 = _nearest_product(p)
        if m1 is None:
            continue
        before = set(gm.graph.nodes)
        try:
            left = _fold(gm, m1, p, constant)
        except Exception as e:  # one region we cannot analyse must not fail the user's compile
            from . import internal_error

            for n in reversed([n for n in gm.graph.nodes if n not in before]):
                gm.graph.erase_node(n)  # a fold that failed before its swap: the new nodes are unused
            left = "unknown", internal_error(e)
        if left:
            rejected.append((p, *left))
    return rejected


def _probabilities(m2: fx.Node) -> fx.Node | None:
    operand = m2.args[1] if nodes.kind(m2) == "einsum" else m2.args[0]
    if isinstance(operand, list | tuple):
        operand = operand[0]
    while isinstance(operand, fx.Node) and (nodes.view_fn(operand) or nodes.is_inactive_dropout(operand)):
        operand = operand.args[0]
    if not isinstance(operand, fx.Node) or operand.op not in ("call_function", "call_method"):
        return None
    if nodes.kind(operand) in ("entmax", "softmax", "sdpa", "matmul", "einsum", "decode_attn"):
        return None
    return operand if nodes.is_tensor(operand) else None


def _nearest_product(p: fx.Node, limit: int = 4096) -> fx.Node | None:
    seen, frontier = {p}, [p]
    while frontier and len(seen) < limit:
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if nodes.kind(a) in nodes.PRODUCT_KINDS:
                    return a
                if a not in seen:
                    seen.add(a)
                    nxt.append(a)
        frontier = nxt
    return None


def _window(m1: fx.Node, p: fx.Node) -> list[fx.Node]:
    """Nodes on some path ``m1 → p`` (inclusive), in graph order."""
    order = list(m1.graph.nodes)
    lo, hi = order.index(m1), order.index(p)
    desc = {m1}
    for n in order[lo + 1 : hi + 1]:
        if any(a in desc for a in n.all_input_nodes):
            desc.add(n)
    anc = {p}
    for n in reversed(order[lo:hi]):
        if n in desc and any(u in anc for u in n.users):
            anc.add(n)
    return [n for n in order[lo : hi + 1] if n in anc]


def _cuts(window: list[fx.Node]) -> list[fx.Node]:
    """Nodes every ``m1 → p`` path passes through (the first and last included), in graph order."""
    index = {n: i for i, n in enumerate(window)}
    reach, cuts = -1, []
    for i, n in enumerate(window):
        if reach <= i:
            cuts.append(n)
        reach = max([reach, *(index[u] for u in n.users if u in index)])
    return cuts


def _fold(gm: fx.GraphModule, m1: fx.Node, p: fx.Node, constant: nodes.Constants) -> tuple[str, str] | None:
    """Fold the normaliser ending at ``p``; None when done (or not a normaliser), else ``(kind, reason)``."""
    p_val = nodes.val(p)
    if any(not isinstance(s, int) for s in p_val.shape) or p_val.numel() > _MAX_PROBE:
        return None
    window = _window(m1, p)
    if len(window) > _MAX_REGION:
        return None
    left = None
    for x in reversed(_cuts(window)[:-1]):
        region = window[window.index(x) + 1 :]
        probes = _probes(x)
        outs = [_run(region, x, probe, constant) for probe in probes]
        if not probes or any(out is None for out in outs):
            continue
        # identified on all probes at once: α is one number for every probe
        probe = torch.stack(probes)
        found = _identify(probe, torch.stack(outs))
        if isinstance(found, str):
            left = left or ("unknown", found)
        if not isinstance(found, tuple):
            continue
        alpha, dim = found
        if probe.dtype not in _FOLD_DTYPES:
            return "hand-written", f"dtype {probe.dtype} is not supported (fp32/fp16/bf16), α={alpha:g}"
        emit = Emitter(gm.graph, p.meta)
        with gm.graph.inserting_before(p):
            new = emit(torch.ops.entmaxkv.entmax.default, x, alpha, dim)
            if nodes.val(new).dtype != p_val.dtype:
                new = emit("to", new, p_val.dtype)
        new.meta["entmaxkv_kind"] = "hand-written"
        p.replace_all_uses_with(new)
        erase_dead([p])
        log.info("entmaxkv: hand-written α-entmax (α=%g) folded into one node at %s", alpha, nodes.where(new))
        return None
    return left


def _probes(x: fx.Node) -> list[Tensor]:
    """Random inputs of ``x``'s shape at several spreads: a wide one alone leaves few rows with two or more
    support entries (at S = 2 one row), and then nearly any α fits — α = 2.5 once passed as 1.974."""
    v = nodes.val(x)
    if not isinstance(v, Tensor) or not v.is_floating_point() or any(not isinstance(s, int) for s in v.shape):
        return []
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        g = torch.Generator().manual_seed(0)
        return [(torch.randn(v.shape, generator=g) * s).to(device=v.device, dtype=v.dtype) for s in _SPREADS]


def _run(region: list[fx.Node], x: fx.Node, probe: Tensor, constant: nodes.Constants) -> Tensor | None:
    """Evaluate ``region`` with ``x = probe``; None if it reads anything but constants."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    env: dict[fx.Node, Any] = {x: probe}
    members = set(region)
    for n in region:
        for a in n.all_input_nodes:
            if a not in env and a not in members:
                value = constant(a)
                if value is None:
                    return None
                # the region may write its inputs in place: never hand it a real parameter
                env[a] = value.clone() if isinstance(value, Tensor) else value
    with unset_fake_temporarily(), torch.no_grad():
        try:
            for n in region:
                args = fx.node.map_arg(n.args, env.__getitem__)
                kwargs = fx.node.map_arg(n.kwargs, env.__getitem__)
                if n.op == "call_method":
                    env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
                elif n.op == "call_function":
                    env[n] = n.target(*args, **kwargs)
                else:
                    return None
        except Exception:  # a region we cannot run is not one we can verify
            return None
    out = env[region[-1]]
    return out if isinstance(out, Tensor) and out.shape == probe.shape else None


def _identify(x: Tensor, p: Tensor) -> tuple[float, int] | str | None:
    """``(alpha, dim)`` if ``p`` is α-entmax of ``x`` along ``dim``; else why not (None: not a normaliser)."""
    tol = _TOL.get(x.dtype, _HALF_TOL)
    xf, pf = x.double(), p.double()
    if not torch.isfinite(pf).all():
        return "the normaliser produced non-finite values on a test input"
    dims = [d for d in range(x.dim()) if x.shape[d] > 1 and (pf.sum(d) - 1).abs().max() <= 10 * tol]
    if not dims:
        return None  # not a normaliser at all: nothing attention-like to report
    dim = dims[-1]
    if bool((pf > 0).all()):
        return "a dense normaliser (softmax-like), not α-entmax"
    alpha = _fit_alpha(xf.movedim(dim, -1), pf.movedim(dim, -1))
    if alpha <= _ALPHA_FLOOR + 1e-3:  # the search stopped at its floor: the best α may lie below it
        return f"not α-entmax (best fit α is at the searched floor {_ALPHA_FLOOR:g}: softmax-like)"
    candidates = [round(alpha, 3), alpha]
    candidates = [c for c in (1.5, 2.0) if abs(c - alpha) < 0.02] + candidates
    for a in candidates:
        if 1.0 < a <= 2.0:
            ref = reference_entmax(x.float(), a, dim).double()
            if (ref - pf).abs().max() <= tol:
                # identifiable only if the probes also rule out α + 0.5 (beyond the op's range for α > 1.5):
                # a 2.5-entmax on uninformative probes once fitted α = 1.974 (now caught by the spreads)
                if (_any_alpha_entmax(x, a + 0.5, dim) - pf).abs().max() <= tol:
                    return f"α is not identifiable on this shape (α={a:g} and α={a + 0.5:g} both fit)"
                return a, dim - x.dim()
    return f"not α-entmax (best fit α={alpha:.4f} does not reproduce it)"


def _any_alpha_entmax(x: Tensor, alpha: float, dim: int) -> Tensor:
    """α-entmax for any α > 1 (the reference accepts only (1, 2]), in float64."""
    xt = x.double().movedim(dim, -1)
    z = (xt - xt.amax(-1, keepdim=True)) * (alpha - 1.0)
    tau, zmax = _shifted_threshold(z, alpha)
    p = entmax_probs(z - zmax, tau, alpha)
    return (p / p.sum(-1, keepdim=True)).movedim(-1, dim)


def _fit_alpha(x: Tensor, p: Tensor) -> float:
    """α for which ``p^(α−1)/(α−1) − x`` is constant over each row's support (golden-section search)."""
    support = p > 1e-6 * p.amax(-1, keepdim=True)
    rows = support.sum(-1) >= 2
    x, p, support = x[rows], p[rows], support[rows]

    def spread(a: float) -> float:
        c = p.clamp_min(1e-300).pow(a - 1) / (a - 1) - x
        hi = torch.where(support, c, -math.inf).amax(-1)
        lo = torch.where(support, c, math.inf).amin(-1)
        return float((hi - lo).mean()) if len(hi) else math.inf

    grid = [_ALPHA_FLOOR + 0.05 * i for i in range(20)]
    best = min(grid, key=spread)
    lo, hi = max(_ALPHA_FLOOR, best - 0.05), min(2.0, best + 0.05)
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if spread(a) < spread(b):
            hi = b
        else:
            lo = a
    return (lo + hi) / 2
