"""Per-cache metadata, kept up to date incrementally: key sketches and page boxes.

``update_kernel`` (grid ``[B·Hkv, NU]``) reads the group's watermark ``wm`` (one past the last valid
position seen by the previous call, −1 = rebuild) and decides on device what to (re)build:

* rebuild everything when ``wm < 0``, when position ``wm − 1`` is no longer valid (the sequence got
  shorter: a new one started) or when position ``wm + Lq`` is already valid (more than one step's worth
  of tokens appeared: a new prefill);
* otherwise only the window ``[wm − Lq, wm + Lq)``, which holds every position a decode step of ``Lq``
  query tokens can have written.

The end of the (re)built range is stored as ``vend``: the sketch scoring pass reads no position past it.

Sketch (``SK`` 1: int8, 2: int4): per token and channel group of ``GS``, ``step = max|k|/qmax`` stored in
fp16, ``code = round(k/step)``, and the residual ``r = ‖k − k̂‖₂`` — ``k̂ = code·step`` exactly, as the scoring
kernel forms it (integer dots per channel group, scaled by the step after the dot) — inflated by the fp32
rounding slack
``γ·(2‖k̂‖₂ + r)`` (``γ = 2(D+2)·2⁻²⁴``) so ``|fl(q·k) − fl(q·k̂)| ≤ ‖q‖₂·r`` holds for computed scores.
Any step gives a valid bound because ``r`` is measured against the stored reconstruction. ``ROT``: the
sketch is of ``R·k`` (``reference.sketch.rotation``, computed by ``common.rotate``), and ``r`` grows by
``rot_eps·‖k‖₂``, which covers the distance from ``fl(R·k)`` to ``R·k``.

Probes: every ``update_kernel`` program re-reads the ``P`` key rows per group recorded by the previous call
and rebuilds when any changed (a new sequence written into the same cache can look like an append; NaN keys
always do); the output kernel, once it has advanced ``wm``, records the rows at positions spread over
``[0, wm)`` (``record_probes``).

Boxes (``BOX``): element-wise min/max over a page's valid keys, in the key dtype (exact); +inf/−inf for a
page without valid tokens. The output kernel advances ``wm`` at the end of the call.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import NEG_INF, group_rows, load_bias, load_q, pdl_enter, rotate


@triton.jit
def _quantize(x, BT: tl.constexpr, W: tl.constexpr, GS: tl.constexpr, QMAX: tl.constexpr):
    """Codes ``[BT, W]`` (fp32 integers), fp16 steps ``[BT, W/GS]``, ``‖x−x̂‖₂`` and ``‖x̂‖₂`` per row, for
    the reconstruction ``x̂ = code·step`` exactly as the scoring kernel forms it (norms scaled by the row's
    largest element, so keys of 1e-20 do not underflow to a zero residual)."""
    xg = tl.reshape(x, [BT, W // GS, GS])
    step = tl.minimum(tl.max(tl.abs(xg), axis=2) / QMAX, 65504.0).to(tl.float16)
    sf = step.to(tl.float32)[:, :, None]
    code = tl.floor(xg / tl.where(sf > 0, sf, 1.0) + 0.5)
    code = tl.where(sf > 0, tl.minimum(tl.maximum(code, -QMAX), QMAX), 0.0)
    xh = code * sf
    return (
        tl.reshape(code, [BT, W]),
        step,
        _norm(tl.reshape(xg - xh, [BT, W])),
        _norm(tl.reshape(xh, [BT, W])),
    )


@triton.jit
def _norm(x):
    """``‖x‖₂`` per row of ``x [BT, W]``, as ``max|x|·‖x/max|x|‖₂`` (no under- or overflow of the squares)."""
    m = tl.max(tl.abs(x), axis=1)
    xs = x / tl.where(m > 0, m, 1.0)[:, None]
    return m * tl.sqrt(tl.sum(xs * xs, axis=1))


@triton.jit
def _valid_at(
    bias_base, hq, qp, rmask, pos, S, sbh, sbl, sbs, HAS_BIAS: tl.constexpr, BIAS_ROWS: tl.constexpr
):
    """Whether any row of the group may attend position ``pos`` (a scalar; out of range → False)."""
    p = pos + tl.zeros([2], tl.int32)
    bias = load_bias(bias_base, hq, qp, rmask, p, (p >= 0) & (p < S), sbh, sbl, sbs, HAS_BIAS, BIAS_ROWS)
    return tl.max(tl.max(bias, axis=1), axis=0) > NEG_INF


@triton.jit
def record_probes(k_base, sks, wm, pos_ptr, rows_ptr, bh64, D: tl.constexpr, P: tl.constexpr):
    """Records the key rows at ``P`` positions spread over ``[0, wm)`` (the output kernel, once it has
    advanced a group's ``wm``; ``update_kernel`` compares them at the next call)."""
    j = tl.arange(0, P)
    d = tl.arange(0, D)
    pos = tl.maximum(wm - 1, 0).to(tl.int64) * j // (P - 1)
    tl.store(pos_ptr + bh64 * P + j, pos.to(tl.int32))
    tl.store(
        rows_ptr + (bh64 * P + j)[:, None] * D + d[None, :], tl.load(k_base + pos[:, None] * sks + d[None, :])
    )


@triton.jit
def _probed_rows_changed(k_base, sks, pos_ptr, rows_ptr, bh64, D: tl.constexpr, P: tl.constexpr):
    """Whether a key row recorded by ``record_probes`` differs from the cache now (NaN keys: always)."""
    j = tl.arange(0, P)
    d = tl.arange(0, D)
    pos = tl.load(pos_ptr + bh64 * P + j).to(tl.int64)
    cur = tl.load(k_base + pos[:, None] * sks + d[None, :])
    rec = tl.load(rows_ptr + (bh64 * P + j)[:, None] * D + d[None, :])
    return tl.sum(tl.sum((cur != rec).to(tl.int32), axis=1), axis=0) > 0


@triton.jit
def _sketch_range(
    k_base, sks, code_ptr, scale_ptr, res_ptr, bh64, cap, lo, hi, slot, nu, rot_eps, BT: tl.constexpr,
    D: tl.constexpr, GS: tl.constexpr, SK: tl.constexpr, ROT: tl.constexpr,
):  # fmt: skip
    """Writes the sketch of positions ``[lo, hi)`` in tiles of ``BT``: tile ``i`` by the program whose
    ``slot`` is ``i mod nu``."""
    NG: tl.constexpr = D // GS
    W: tl.constexpr = D if SK == 1 else D // 2
    QMAX: tl.constexpr = 127.0 if SK == 1 else 7.0
    d = tl.arange(0, D)
    w = tl.arange(0, W)
    for t0 in range(lo + slot * BT, hi, nu * BT):
        pos = t0 + tl.arange(0, BT)
        p64 = pos.to(tl.int64)
        pm = pos < hi
        kt = tl.load(k_base + p64[:, None] * sks + d[None, :], mask=pm[:, None], other=0.0).to(tl.float32)
        if ROT:  # the sketch of R·k: fl(R·k) is within rot_eps·‖k‖₂ of it, which joins the residual
            slack = rot_eps * _norm(kt)
            kt = rotate(kt, D)
        code, step, res, nrm = _quantize(kt, BT, D, GS, QMAX)
        if SK == 2:  # channel j in the low nibble of byte j, channel j + D/2 in the high one
            clo, chi = tl.split(tl.permute(tl.reshape(code, [BT, 2, W]), (0, 2, 1)))
            code = (clo.to(tl.int32) & 15) | (chi.to(tl.int32) << 4)  # two's complement nibbles
        tl.store(code_ptr + (bh64 * cap + p64)[:, None] * W + w[None, :], code.to(tl.int8), mask=pm[:, None])
        sptr = scale_ptr + (bh64 * cap + p64)[:, None] * NG + tl.arange(0, NG)[None, :]
        tl.store(sptr, step, mask=pm[:, None])
        if ROT:
            res += slack
        gamma: tl.constexpr = 2.0 * (D + 2) * 5.9604644775390625e-08
        res = res + gamma * (2.0 * nrm + res)
        # a row with ±inf (or, rotated, past the fp32 range: inf − inf) has a NaN norm: a candidate always
        tl.store(res_ptr + bh64 * cap + p64, tl.where(res == res, res, float("inf")), mask=pm)


@triton.jit
def update_kernel(
    k_ptr,
    bias_ptr,
    wm_ptr,
    vend_ptr,
    mode_ptr,
    code_ptr,
    scale_ptr,
    res_ptr,
    q_ptr,
    qrot_ptr,
    kmin_ptr,
    kmax_ptr,
    hist_ptr,
    probe_pos_ptr,
    probe_rows_ptr,
    sqb,
    sqh,
    sql,
    skb,
    skh,
    sks,
    sbb,
    sbh,
    sbl,
    sbs,
    Hkv,
    S,
    cap,
    pcap,
    rot_eps,
    G: tl.constexpr,
    LQ: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    D: tl.constexpr,
    GS: tl.constexpr,
    SK: tl.constexpr,
    BOX: tl.constexpr,
    PS: tl.constexpr,
    BT: tl.constexpr,
    BTW: tl.constexpr,
    RQ: tl.constexpr,
    BPG: tl.constexpr,
    P: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROWS: tl.constexpr,
    ROT: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_enter(PDL)
    bh = tl.program_id(0)
    pid = tl.program_id(1)
    nu = tl.num_programs(1)
    b = bh // Hkv
    kvh = bh % Hkv
    bh64 = bh.to(tl.int64)
    r, rmask, hq, qp = group_rows(kvh, G, LQ, R, RP)
    bias_base = bias_ptr + b.to(tl.int64) * sbb
    k_base = k_ptr + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
    wm = tl.load(wm_ptr + bh)
    # every program compares the probed rows itself (L2 hits after the first): one launch fewer per step
    wm = tl.where(_probed_rows_changed(k_base, sks, probe_pos_ptr, probe_rows_ptr, bh64, D, P), -1, wm)
    kept_prev = _valid_at(bias_base, hq, qp, rmask, wm - 1, S, sbh, sbl, sbs, HAS_BIAS, BIAS_ROWS)
    shrunk = (wm > 0) & (kept_prev == 0)
    jumped = _valid_at(bias_base, hq, qp, rmask, wm + LQ, S, sbh, sbl, sbs, HAS_BIAS, BIAS_ROWS)
    rebuild = (wm < 0) | shrunk | jumped
    lo = tl.where(rebuild, 0, tl.maximum(wm - LQ, 0))
    hi = tl.where(rebuild, S, tl.minimum(wm + LQ, S))
    if pid == 0:
        tl.store(mode_ptr + bh, 0)
        tl.store(vend_ptr + bh, hi)  # no valid position at or past it: the sketch scan stops there
        if BOX:  # the top-k selection's radix histograms (the page scoring adds the first round)
            tl.store(hist_ptr + bh64 * 1024 + tl.arange(0, 1024), tl.zeros([1024], tl.int32))
    if ROT and pid == 0:  # the group's query rows, rotated once for every scoring program (qrot[bh, r])
        # on RQ = max(4, p2(R)) rows, not the RP padded ones: a shorter butterfly
        rq, rqm, hqq, qpq = group_rows(kvh, G, LQ, R, RQ)
        d = tl.arange(0, D)
        qf = load_q(q_ptr, b, hqq, qpq, rqm, sqb, sqh, sql, D).to(tl.float32)
        tl.store(qrot_ptr + (bh64 * R + rq)[:, None] * D + d[None, :], rotate(qf, D), mask=rqm[:, None])
    if SK != 0:
        # a rebuild in tiles of BT; a decode step's window (≤ 2·Lq positions) in tiles of BTW = min(BT,
        # p2(2·Lq)), one tile up to Lq = 16: the butterfly's shuffles grow with the tile (rotated int4, one
        # tile of 32 rows: ~15 µs per step); tiles are dealt from program 1 on, so that with ROT program 0's
        # query rotation runs beside the first tile (with one program, program 0 does both)
        slot = (pid + nu - 1) % nu
        args = (k_base, sks, code_ptr, scale_ptr, res_ptr, bh64, cap, lo, hi, slot, nu, rot_eps)
        if rebuild:
            _sketch_range(*args, BT, D, GS, SK, ROT)
        else:
            _sketch_range(*args, BTW, D, GS, SK, ROT)
    if BOX:
        d = tl.arange(0, D)
        j = tl.arange(0, BPG * PS)
        for p0 in range(lo // PS + pid * BPG, tl.cdiv(hi, PS), nu * BPG):
            pos = p0 * PS + j
            bias = load_bias(bias_base, hq, qp, rmask, pos, pos < S, sbh, sbl, sbs, HAS_BIAS, BIAS_ROWS)
            tv = tl.max(bias, axis=0) > NEG_INF
            kt = tl.load(k_base + pos.to(tl.int64)[:, None] * sks + d[None, :], mask=tv[:, None], other=0.0)
            k3 = tl.reshape(kt.to(tl.float32), [BPG, PS, D])
            t3 = tl.reshape(tv, [BPG, PS])[:, :, None]
            kmn = tl.min(tl.where(t3, k3, float("inf")), axis=1)
            kmx = tl.max(tl.where(t3, k3, NEG_INF), axis=1)
            pg = p0 + tl.arange(0, BPG)
            off = (bh64 * pcap + pg)[:, None] * D + d[None, :]
            pm = (pg < tl.cdiv(S, PS))[:, None]
            tl.store(kmin_ptr + off, kmn.to(kmin_ptr.dtype.element_ty), mask=pm)
            tl.store(kmax_ptr + off, kmx.to(kmax_ptr.dtype.element_ty), mask=pm)
