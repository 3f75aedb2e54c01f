"""Triton helpers shared by the decode kernels.

Conventions: a *group* is one (batch row, KV head); its rows are the ``R = G·Lq`` query rows that read it
(row ``r`` is query head ``kvh·G + r // Lq`` at query position ``r % Lq``), padded to ``RP ≥ 16`` rows so
that ``tl.dot`` can score all of them in one pass. Scores are kept as ``z = (α−1)·(scale·q·k + bias)`` in
fp32; ``−inf`` marks masked tokens and padded rows. ``F32`` kernels compute dots on fp32 operands with
``input_precision="ieee"`` (fp32 models, and the Triton interpreter, which stores bf16 as uint16).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

NEG_INF = tl.constexpr(float("-inf"))
SOLVE_SMALL = tl.constexpr(512)  # lists up to this long are solved on a small register block


@triton.jit
def cvt(x, F32: tl.constexpr):
    """Operand of ``mm``: fp32 when ``F32``, the loaded dtype otherwise."""
    if F32:
        x = x.to(tl.float32)
    return x


@triton.jit
def mm(a, b, F32: tl.constexpr):
    """``a @ b`` with fp32 accumulation (exact products for 16-bit operands)."""
    if F32:
        acc = tl.dot(a, b, input_precision="ieee")
    else:
        acc = tl.dot(a, b)
    return acc


@triton.jit
def pow_beta(x, beta, MODE: tl.constexpr):
    """``x^β`` for ``x ≥ 0`` (``MODE`` 2: β=1, 1: β=2, 0: any β via exp2/log2)."""
    if MODE == 2:
        y = x
    elif MODE == 1:
        y = x * x
    else:
        y = tl.where(x > 0, tl.exp2(beta * tl.log2(tl.maximum(x, 1e-30))), 0.0)
    return y


@triton.jit
def dpow_beta(x, beta, MODE: tl.constexpr):
    """``β·x^(β−1)`` for ``x > 0``, 0 otherwise (minus the derivative of ``pow_beta`` in τ)."""
    if MODE == 2:
        y = tl.where(x > 0, 1.0, 0.0)
    elif MODE == 1:
        y = 2.0 * x
    else:
        y = tl.where(x > 0, beta * tl.exp2((beta - 1.0) * tl.log2(tl.maximum(x, 1e-30))), 0.0)
    return y


@triton.jit
def rotate(x, D: tl.constexpr):
    """``fl(R·x)`` of the rows of ``x [M, D]`` fp32, ``R`` the normalised Sylvester–Hadamard matrix
    (``reference.sketch.rotation``): ``× fl(D^-½)`` first — so no partial sum is larger than ``√D·max|x|``
    and the result overflows only where ``‖x‖₂`` nears the fp32 range — then a butterfly ``(a, b) → (a + b,
    a − b)`` per bit of the channel index. Each output is a sum of ``±fl(x_i·D^-½)`` in a fixed order, so it
    is within ``reference.sketch.rotation_eps(D)·‖x‖₂`` of exact, as any fp32 dot product would be."""
    m: tl.constexpr = x.shape[0]
    x = x * tl.div_rn(1.0, tl.sqrt_rn(D * 1.0))
    for i in tl.static_range(12):
        if (1 << i) < D:  # pairs (j, j + 2^i) of channels j whose bit i is 0
            y = tl.permute(tl.reshape(x, [m, D >> (i + 1), 2, 1 << i]), (0, 1, 3, 2))
            a, b = tl.split(y)
            x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), [m, D])
    return x


@triton.jit
def group_rows(kvh, G: tl.constexpr, LQ: tl.constexpr, R: tl.constexpr, RP: tl.constexpr):
    """Row ids, row mask, query head and query position of a group's padded rows."""
    r = tl.arange(0, RP)
    hq = kvh * G + r // LQ
    return r, r < R, hq, r % LQ


@triton.jit
def load_q(q_ptr, b, hq, qp, rmask, sqb, sqh, sql, D: tl.constexpr):
    """The group's queries ``[RP, D]`` in their dtype (0 for padded rows)."""
    d = tl.arange(0, D)
    ptr = q_ptr + b.to(tl.int64) * sqb + hq[:, None] * sqh + qp[:, None] * sql + d[None, :]
    return tl.load(ptr, mask=rmask[:, None], other=0.0)


@triton.jit
def load_bias(
    bias_base, hq, qp, rmask, pos, pmask, sbh, sbl, sbs, HAS_BIAS: tl.constexpr, BIAS_ROWS: tl.constexpr
):
    """Bias ``[RP, N]`` at token positions ``pos`` (fp32, −inf where masked, padded or out of range).

    ``BIAS_ROWS == 1``: the bias is the same for every row of the group (loaded once as a vector).
    """
    if HAS_BIAS:
        if BIAS_ROWS == 1:
            bv = tl.load(bias_base + pos.to(tl.int64) * sbs, mask=pmask, other=NEG_INF)
            bias = tl.where(rmask[:, None], bv[None, :], NEG_INF)
        else:
            ptr = bias_base + hq[:, None] * sbh + qp[:, None] * sbl + pos.to(tl.int64)[None, :] * sbs
            bias = tl.load(ptr, mask=rmask[:, None] & pmask[None, :], other=NEG_INF)
    else:
        bias = tl.where(rmask[:, None] & pmask[None, :], 0.0, NEG_INF)
    return bias


@triton.jit
def bracket_start(hist, zmax, beta, MODE: tl.constexpr, NB: tl.constexpr):
    """A start ``τ₀ ≤ τ`` from a histogram of ``z`` over ``[zmax − 1, zmax)`` (``hist[i]`` tokens in bin
    ``i`` of width ``1/NB``, entries ``≥ NB`` ignored): the largest bin edge ``e_j`` whose lower bound
    ``Σ_{i ≥ j} n_i·((i − j)/NB)^β`` on ``Σ[z − e_j]_+^β`` still reaches 1."""
    i = tl.arange(0, 2 * NB)
    j = tl.arange(0, NB)
    gap = tl.maximum((i[None, :] - j[:, None]).to(tl.float32) / NB, 0.0)
    lb = tl.sum(
        tl.where((i < NB)[None, :], hist[None, :].to(tl.float32) * pow_beta(gap, beta, MODE), 0.0), axis=1
    )
    return zmax - 1.0 + tl.max(tl.where(lb >= 1.0, j, 0)).to(tl.float32) / NB


@triton.jit
def compact_block(a_ptr, b_ptr, cnt, a, b, keep):
    """Writes a loaded block of pairs ``(a, b)`` where ``keep`` to a list of pairs at ``cnt`` (order kept)
    and returns the new count. In place — the block read from the same list — no slot lies past its entry's
    own position, so after the barrier no write overtakes another thread's read."""
    ki = keep.to(tl.int32)
    slot = cnt + tl.cumsum(ki, 0) - 1
    tl.debug_barrier()
    tl.store(a_ptr + slot, a, mask=keep)
    tl.store(b_ptr + slot, b, mask=keep)
    return cnt + tl.sum(ki)


@triton.jit
def _add2(a, b, c, d):
    return a + c, b + d


@triton.jit
def newton_step(tau, f, g):
    """One Newton step on ``f(τ) = Σ[z − τ]_+^β`` towards 1 (``g = −f′``); also whether it moved."""
    step = (f - 1.0) / tl.maximum(g, 1e-30)
    return tau + tl.maximum(step, 0.0), step > 1e-7 * tl.maximum(tl.abs(tau), 1.0)


@triton.jit
def newton_tile(z, tau, go, beta, MODE: tl.constexpr, MAXIT: tl.constexpr):
    """Newton from ``tau`` on the register tile ``z`` (any shape, −inf where empty), one reduction a step."""
    zr = tl.reshape(z, [z.numel])
    it = tl.full([], 0, tl.int32)
    while (it < MAXIT) & go:
        x = tl.maximum(zr - tau, 0.0)
        f, g = tl.reduce((pow_beta(x, beta, MODE), dpow_beta(x, beta, MODE)), 0, _add2)
        tau, go = newton_step(tau, f, g)
        it += 1
    return tau


@triton.jit
def _newton_regs(z_ptr, n, tau, go, beta, MODE: tl.constexpr, N: tl.constexpr, MAXIT: tl.constexpr):
    """Newton from ``tau`` on ``z_ptr[0:n]`` (``n ≤ N``) held in registers."""
    o = tl.arange(0, N)
    return newton_tile(tl.load(z_ptr + o, mask=o < n, other=NEG_INF), tau, go, beta, MODE, MAXIT)


@triton.jit
def solve_tau(z_ptr, n, zmax, tau0, beta, MODE: tl.constexpr, BLOCK: tl.constexpr, MAXIT: tl.constexpr):
    """τ with ``Σ_j [z_j − τ]_+^β = 1`` over ``z_ptr[0:n]`` (fp32, −inf allowed); ``zmax = max z``.

    Newton's method from ``τ₀ ≤ τ`` (e.g. ``zmax − 1``, where the sum is ≥ 1): the sum is convex and
    decreasing in τ, so the iterates rise monotonically to the root without overshooting; α = 2 ends
    exactly once the support is found. Rows with no finite entry get τ = 0.
    """
    go = zmax > NEG_INF
    if n <= SOLVE_SMALL:  # the usual support: a short list, few registers
        tau = _newton_regs(z_ptr, n, tau0, go, beta, MODE, SOLVE_SMALL, MAXIT)
    elif n <= BLOCK:  # the list stays in registers across iterations
        tau = _newton_regs(z_ptr, n, tau0, go, beta, MODE, BLOCK, MAXIT)
    else:
        tau = tau0
        it = tl.full([], 0, tl.int32)
        while (it < MAXIT) & go:
            fv = tl.zeros([BLOCK], tl.float32)
            gv = tl.zeros([BLOCK], tl.float32)
            for s0 in range(0, n, BLOCK):
                o = s0 + tl.arange(0, BLOCK)
                x = tl.maximum(tl.load(z_ptr + o, mask=o < n, other=NEG_INF) - tau, 0.0)
                fv += pow_beta(x, beta, MODE)
                gv += dpow_beta(x, beta, MODE)
            tau, go = newton_step(tau, tl.sum(fv), tl.sum(gv))
            it += 1
    return tl.where(zmax > NEG_INF, tau, 0.0)


@triton.jit
def _seg_load(idx_base, z_base, sl, inr, segcap, r, rmask, R: tl.constexpr, HI: tl.constexpr):
    """Segment entries ``sl``: positions ``[N]``, lower and upper scores ``[RP, N]`` (equal when ``~HI``)."""
    zm = rmask[:, None] & inr[None, :]
    zp = z_base + r[:, None] * segcap + sl[None, :]
    zlo = tl.load(zp, mask=zm, other=NEG_INF)
    zhi = tl.load(zp + R * segcap, mask=zm, other=NEG_INF) if HI else zlo
    return tl.load(idx_base + sl, mask=inr, other=0), zlo, zhi


@triton.jit
def seg_store(
    idx_base, z_base, slot, keep, idx, zlo, zhi, segcap, r, rmask, R: tl.constexpr, HI: tl.constexpr
):
    """Writes entries (positions ``idx``, lower and upper scores) at ``slot`` where ``keep``."""
    tl.store(idx_base + slot, idx, mask=keep)
    zp = z_base + r[:, None] * segcap + slot[None, :]
    tl.store(zp, zlo, mask=rmask[:, None] & keep[None, :])
    if HI:
        tl.store(zp + R * segcap, zhi, mask=rmask[:, None] & keep[None, :])


@triton.jit
def refilter(
    idx_base, z_base, n, segcap, thr, r, rmask, R: tl.constexpr, HI: tl.constexpr, BLOCK: tl.constexpr
):
    """Drop a segment's entries with ``z_hi ≤ thr`` for every row (they cannot matter); the new count.

    What made segments long is background kept before the program knew its maximum: it sits early in the
    segment. Blocks are compacted in place from the start until one drops nothing; the gap left before it is
    filled with entries from the segment's end (order inside a segment does not matter), so the work is
    proportional to what is dropped, not to the segment (a dense 7% segment at 1M holds ~1,100 entries)."""
    tl.debug_barrier()  # the segment was written by all threads of this program
    k = tl.full([], 0, tl.int32)  # entries kept so far, compacted to [0, k)
    s0 = tl.full([], 0, tl.int32)
    dirty = n > 0
    while dirty:
        sl = s0 + tl.arange(0, BLOCK)
        inr = sl < n
        idx, zlo, zhi = _seg_load(idx_base, z_base, sl, inr, segcap, r, rmask, R, HI)
        keep = (tl.sum((zhi > thr[:, None]).to(tl.int32), axis=0) > 0) & inr
        ki = keep.to(tl.int32)
        nk = tl.sum(ki)
        dirty = nk < tl.minimum(n - s0, BLOCK)
        if dirty:
            slot = k + tl.cumsum(ki, 0) - 1  # ≤ sl: compacting in place never overtakes the reads
            tl.debug_barrier()
            seg_store(idx_base, z_base, slot, keep, idx, zlo, zhi, segcap, r, rmask, R, HI)
            k += nk
            s0 += BLOCK
            dirty = s0 < n
    s0 = tl.minimum(s0, n)
    m = tl.minimum(s0 - k, n - s0)  # entries moved from the end into the gap [k, s0)
    tl.debug_barrier()
    for c0 in range(0, m, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        inr = c < m
        idx, zlo, zhi = _seg_load(idx_base, z_base, n - m + c, inr, segcap, r, rmask, R, HI)
        seg_store(idx_base, z_base, k + c, inr, idx, zlo, zhi, segcap, r, rmask, R, HI)
    return n - (s0 - k)


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Programmatic dependent launch: wait until the previous kernel's writes are visible, then let the next
    kernel's programs launch (they wait here likewise), so launches overlap their predecessors' tails."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
