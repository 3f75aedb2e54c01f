"""Scoring kernels: one pass over a group's tokens computing fp32 ``z`` for all its rows at once.

``score_kernel`` (grid ``[B·Hkv, NSPLIT]``, one token range per program) scores every token of its range from
the exact keys (``SRC == 0``) or from a key sketch (``SRC`` 1: int8, 2: int4) with a per-token bound ``[z_lo,
z_hi]``. With ``KEEP`` it keeps the tokens that can matter (``z_hi > M̃ − 1`` for some row, ``M̃ ≤ max z_lo``
a running maximum shared by all programs of the group through ``gmax``; τ ≥ max z − 1 makes every other token
irrelevant; programs exchange their running maxima through ``gmax`` every ``SYNC`` tiles and take each answer
at the next exchange, so no tile waits on an L2 atomic) in the program's *segment* ``(idx, z_lo[, z_hi])`` of
static capacity ``segcap`` (a count past it marks an overflow). With ``WRITE_WS`` it writes every ``z`` to the
dense workspace (the overflow fallback): instead, or in a short cache as well. ``cand_kernel`` turns a sketch
segment into a segment of exact scores: it keeps the tokens whose upper bound beats ``τ_low`` (the threshold
of the lower bounds, which is ≤ τ by monotonicity), gathers their exact key rows and compacts them in place.

Sketches are scored by int8 tensor-core dots on the codes as loaded (int4 nibbles unpacked to int8 in
registers), one dot per channel group of ``GS`` (scaled by the group's step after the dot, exact): the query
is split once per program into two int8 levels on one step per row (``q ≈ s·(c1 + c2/128)``, so a group's
two levels combine exactly in int32), and what those leave (``‖e‖₁·CMAX·step`` per token, ``CMAX`` = 127 or
7) widens the bound.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import NEG_INF, cvt, group_rows, load_bias, load_q, mm, pdl_enter, refilter, seg_store


@triton.jit
def _qrows(
    q_ptr, qrot_ptr, bh, b, kvh, r, rmask, sqb, sqh, sql, G: tl.constexpr, LQ: tl.constexpr, R: tl.constexpr,
    D: tl.constexpr, ROT: tl.constexpr,
):  # fmt: skip
    """The queries of group rows ``r`` in fp32 ``[len(r), D]``: ``fl(R·q)`` as ``update_kernel`` stored it
    (``qrot[bh, r]``) with ``ROT``, else as given."""
    if ROT:
        d = tl.arange(0, D)
        x = tl.load(
            qrot_ptr + (bh.to(tl.int64) * R + r)[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0
        )
    else:
        x = load_q(q_ptr, b, kvh * G + r // LQ, r % LQ, rmask, sqb, sqh, sql, D).to(tl.float32)
    return x


@triton.jit
def _qcode(x, s):
    """``round(x/s)`` as int8 codes (``|x| ≤ 127·s``) and the residual ``x − code·s`` (fp32)."""
    c = tl.floor(x / s[:, None] + 0.5)
    return c.to(tl.int8), x - c * s[:, None]


@triton.jit
def _qenc(
    qf,
    rot_e,
    zmul,
    RS: tl.constexpr,
    RP: tl.constexpr,
    D: tl.constexpr,
    W: tl.constexpr,
    GS: tl.constexpr,
    CW: tl.constexpr,
    CMAX: tl.constexpr,
    UNIT: tl.constexpr,
    PACK: tl.constexpr,
    ROT: tl.constexpr,
    TRANS: tl.constexpr,
):
    """The query rows ``qf [RS, D]`` (``_qrows``) as two int8 levels on one step per row, ``q = s·(c1 +
    c2/128) + e`` (``s = max|q|/127``, so ``|c2| ≤ 64``), cut per channel group ``g`` (channels ``[g·GS,
    (g+1)·GS)``) into ``[RP, CW]`` operands over the code chunk that holds the group (zero outside it);
    ``128·(c1·x) + c2·x`` is then exact in int32 (``< 2³¹`` for ≤ 256 channels, summed over a row's chunks by
    ``TRANS``) and a group's scores are one integer per token, so each group costs one conversion and one
    ``fma`` per score.

    Returns the operands (``TRANS``: ``_trans_operands``; ``PACK``: rows ``i`` and ``RS + i`` hold row ``i``'s
    ``c1`` and ``c2``, one dot yields both; else ``c1`` and ``c2`` apart), the per-row factor
    ``(α−1)·scale·s/(128·UNIT)`` of those
    integers (``UNIT`` the factor the codes carry: int4 nibbles are read as ``16·code``) and the bound term
    per unit step ``(α−1)·scale·CMAX·‖e‖₁`` plus a slack (``D·max|q|·2⁻¹⁹``) for the fp32 rounding; ``ROT``
    (the rows are ``q̃ = fl(R·q)``) adds ``(α−1)·scale·rot_e·‖q̃‖₂·CMAX·√D`` for ``(R·q − q̃)·k̂``."""
    rf = tl.arange(0, RP)
    if RP == RS:
        qrow = qf
    else:  # every row once in [0, RS), again in [RS, RP)
        qrow = tl.reshape(tl.broadcast_to(qf[None, :, :], [RP // RS, RS, D]), [RP, D])
    amax = tl.max(tl.abs(qrow), axis=1)  # one step for every group
    s1 = tl.where(amax > 1e-30, amax / 127.0, 1.0)
    s2 = s1 * 0.0078125
    c1s = ()
    c2s = ()
    el1 = tl.zeros([RP], tl.float32)
    if TRANS:
        c1, e = _qcode(qrow, s1)
        c2, e = _qcode(e, s2)
        el1 += tl.sum(tl.abs(e), axis=1)
        c1s = _trans_operands(c1.to(tl.float32), c2.to(tl.float32), RP, D, W, CW, D // W)
    else:
        for g in tl.static_range(D // GS):
            qd = _qchannels(qrow, g * GS, RP, D, W, GS, CW)
            c1, e = _qcode(qd, s1)
            c2, e = _qcode(e, s2)
            el1 += tl.sum(tl.abs(e), axis=1)
            if PACK:
                c1s += (tl.where((rf < RS)[:, None], c1, c2),)
            else:
                c1s += (c1,)
            c2s += (c2,)
    # amax·(D·2⁻¹⁹), not (D·amax)·2⁻¹⁹: that overflows past 2¹²⁸/D, and ∞ times a zero step is NaN
    qerr = zmul * CMAX * (el1 + amax * (D * 1.9073486328125e-06))
    if ROT:
        qs = qrow / tl.where(amax > 0, amax, 1.0)[:, None]
        qerr += zmul * CMAX * rot_e * amax * tl.sqrt(tl.sum(qs * qs, axis=1) * D)
    qmul = s1 * (zmul / (128 * UNIT))
    if PACK and not TRANS:  # rows [0, RS) hold every row once
        qerr, _ = tl.split(tl.permute(tl.reshape(qerr, [2, RS]), (1, 0)))
        qmul, _ = tl.split(tl.permute(tl.reshape(qmul, [2, RS]), (1, 0)))
    return c1s, c2s, qmul, qerr


@triton.jit
def _qchannels(
    qrow, ch0, RP: tl.constexpr, D: tl.constexpr, W: tl.constexpr, SW: tl.constexpr, CW: tl.constexpr
):  # fmt: skip
    """The channels ``[ch0, ch0 + SW)`` of ``qrow [RP, D]`` in the ``[RP, CW]`` chunk of codes that holds
    them (zero on the chunk's other channels)."""
    col = tl.arange(0, CW)
    c0 = ch0 // W * W + ch0 % W // CW * CW  # first channel of their chunk
    sub = ch0 % CW
    chunks = tl.reshape(qrow, [RP, D // CW, CW])
    qd = tl.sum(tl.where((tl.arange(0, D // CW) == c0 // CW)[None, :, None], chunks, 0.0), axis=1)
    return tl.where(((col >= sub) & (col < sub + SW))[None, :], qd, 0.0)


@triton.jit
def _trans_operands(
    c1, c2, RT: tl.constexpr, D: tl.constexpr, W: tl.constexpr, CW: tl.constexpr, NH: tl.constexpr
):
    """One step per row, tokens along the dot's rows (``TRANS``): for each code chunk and nibble half (``NH``
    per chunk), the ``[CW, 4·RT]`` int8 query operand whose column ``(2·RT)·h + 2·t + l`` holds level ``l``
    of row ``t`` on the chunk's channels in half ``h`` of the head dim (``h = channel // (D/2)``), zero
    elsewhere. A token's ``[4·RT]`` dot row then splits in registers: summing over ``h``
    and combining ``l`` gives its ``RT`` scores with no padded row in the epilogue (a thread of the dot's
    accumulator holds columns ``2t, 2t+1`` of every 8; with ``RT = 4`` that is one row's four terms)."""
    ops = ()
    for c in tl.static_range(W // CW):
        for hs in tl.static_range(NH):
            ch0 = hs * W + c * CW
            ch = ch0 + tl.arange(0, CW)
            x1 = tl.trans(_qchannels(c1, ch0, RT, D, W, CW, CW))  # [CW, RT]
            x2 = tl.trans(_qchannels(c2, ch0, RT, D, W, CW, CW))
            lv = tl.join(x1, x2)  # [CW, RT, 2]
            half = (tl.arange(0, 2)[None, :] == (ch // (D // 2))[:, None])[:, :, None, None]
            op = tl.where(half, lv[:, None, :, :], 0.0)  # [CW, 2, RT, 2]
            ops += (tl.reshape(op, [CW, 4 * RT]).to(tl.int8),)
    return ops


@triton.jit
def _trans_score(acc, step, RT: tl.constexpr):
    """``[RT, N]`` fp32 scores ``(128·(c1·k̂) + c2·k̂)·step`` from a ``TRANS`` accumulator ``[N, 4·RT]``."""
    n: tl.constexpr = acc.shape[0]
    lv = tl.sum(tl.reshape(acc, [n, 2, RT, 2]), axis=1)  # the two halves of the head dim
    x1, x2 = tl.split(lv)
    return tl.trans((x1 * 128 + x2).to(tl.float32) * step[:, None])


@triton.jit
def _gdot(c1, c2, codes, RS: tl.constexpr, PACK: tl.constexpr):
    """``128·(c1·codesᵀ) + c2·codesᵀ`` ``[RS, N]`` (int32, exact): one channel group on the tensor cores."""
    a = tl.dot(c1, tl.trans(codes), out_dtype=tl.int32)
    if PACK:
        a1, a2 = tl.split(tl.permute(tl.reshape(a, [2, RS, codes.shape[0]]), (1, 2, 0)))
        out = a1 * 128 + a2
    else:
        out = a * 128 + tl.dot(c2, tl.trans(codes), out_dtype=tl.int32)
    return out


@triton.jit
def _group_score(qk, c1s, c2s, g: tl.constexpr, codes, steps, RS: tl.constexpr, PACK: tl.constexpr):
    """Adds channel group ``g``'s part of ``q·k̂`` (in units of the query's factor) to ``qk [RS, N]``: its
    integer dot with the codes ``[N, CW]`` of its chunk times its steps (``steps[g]``, ``[N]``)."""
    return tl.fma(_gdot(c1s[g], c2s[g], codes, RS, PACK).to(tl.float32), steps[g][None, :], qk)


@triton.jit
def _nibbles(x, ASM: tl.constexpr):
    """``(x << 4, x & −16)`` of int8 ``x`` (two's complement nibbles: 16·code each), on whole 32-bit words
    with ``ASM`` (3 instructions per 4 bytes where byte-wise code takes ~20)."""
    if ASM:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shl.b32 t, $2, 4; and.b32 $1, $2, 0xF0F0F0F0; and.b32 $0, t, 0xF0F0F0F0; }",
            "=r,=r,r",
            [x],
            dtype=(tl.int8, tl.int8),
            is_pure=True,
            pack=4,
        )
    else:
        lo = x << 4
        hi = x & -16
    return lo, hi


@triton.jit
def _sketch_meta(scale_base, res_base, pos, pm, NGT: tl.constexpr):
    """One tile's fp16 steps ``[N, D/GS]`` and fp32 residuals ``[N]`` (0 where ``~pm``); one step per token
    (``NGT == 1``): both in one fp32 tile ``[N, 2]`` (step, residual), brought to the dot's layout by one
    conversion."""
    p64 = pos.to(tl.int64)
    if NGT == 1:
        c = tl.arange(0, 2)
        off = p64[:, None] + 0 * c[None, :]
        step = tl.load(scale_base + off, mask=pm[:, None] & (c == 0)[None, :], other=0.0)
        res = tl.load(res_base + off, mask=pm[:, None] & (c == 1)[None, :], other=0.0)
        meta = tl.where((c == 0)[None, :], step.to(tl.float32), res)
    else:
        g = tl.arange(0, NGT)
        meta = (
            tl.load(scale_base + p64[:, None] * NGT + g[None, :], mask=pm[:, None], other=0.0),
            tl.load(res_base + p64, mask=pm, other=0.0),
        )
    return meta


@triton.jit
def _tile_steps(meta, NGT: tl.constexpr):
    """A tile's steps per channel group (a tuple of ``[N]``), its largest step and its residuals ``[N]``."""
    if NGT == 1:
        step, res = tl.split(meta)
        steps = (step,)
        mstep = step
    else:
        stepf = meta[0].to(tl.float32)
        res = meta[1]
        steps = ()
        for g in tl.static_range(NGT):
            steps += (tl.sum(tl.where((tl.arange(0, NGT) == g)[None, :], stepf, 0.0), axis=1),)
        mstep = tl.max(stepf, axis=1)
    return steps, mstep, res


@triton.jit
def _max2(a, b, c, d):
    return tl.maximum(a, c), tl.maximum(b, d)


@triton.jit
def score_kernel(
    q_ptr,
    k_ptr,
    bias_ptr,
    code_ptr,
    scale_ptr,
    res_ptr,
    qrot_ptr,
    seg_idx_ptr,
    seg_z_ptr,
    seg_cnt_ptr,
    seg_max_ptr,
    last_ptr,
    gmax_ptr,
    ws_ptr,
    mode_ptr,
    vend_ptr,
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
    sk_cap,
    split_len,
    segcap,
    zmul,
    bmul,
    rot_eps,
    want_mode,
    G: tl.constexpr,
    LQ: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SRC: tl.constexpr,
    GS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROWS: tl.constexpr,
    KEEP: tl.constexpr,
    WRITE_WS: tl.constexpr,
    F32: tl.constexpr,
    SYNC: tl.constexpr,
    PACK: tl.constexpr,
    REFILTER: tl.constexpr,
    ASM: tl.constexpr,
    ROT: tl.constexpr,
    TRANS: tl.constexpr,
    RT: tl.constexpr,
    EARLY: tl.constexpr,
    PDL: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    nsp = tl.num_programs(1)
    b = bh // Hkv
    kvh = bh % Hkv
    bh64 = bh.to(tl.int64)
    # TRANS (a sketch with one step per row): tokens along the dot's rows, RT = max(4, p2(R)) rows of scores
    # (_trans_operands). PACK (Plan.packed: 2R ≤ RP): both int8 query levels share one dot (level 1 in rows
    # [0, RS), level 2 in rows [RS, RP), summed in registers); bounds on RS rows.
    RS: tl.constexpr = RT if TRANS else (RP // 2 if PACK else RP)
    r, rmask, hq, qp = group_rows(kvh, G, LQ, R, RS)
    # The query side reads the op's inputs alone: with EARLY it runs before the wait for the previous kernel,
    # beside its tail (launch.py, "EARLY"); not with ROT (update_kernel writes q̃).
    EARLY_Q: tl.constexpr = EARLY and not ROT
    if not EARLY_Q:
        pdl_enter(PDL)
    if SRC == 0:
        qc = cvt(load_q(q_ptr, b, hq, qp, rmask, sqb, sqh, sql, D), F32)
    else:
        # ROT: every query operand is of q̃ = fl(R·q) (the sketch is of R·k; update_kernel rotates the
        # queries once per step); R·q − q̃ costs the bound rot_e·‖q̃‖₂·‖k‖₂ ≤ rot_e·‖q̃‖₂·(‖k̂‖₂ + r), r
        # covering the keys' side (update_kernel)
        rot_e = rot_eps / (1.0 - rot_eps)
        qf = _qrows(q_ptr, qrot_ptr, bh, b, kvh, r, rmask, sqb, sqh, sql, G, LQ, R, D, ROT)
        amax = tl.max(tl.abs(qf), axis=1)
        qs = qf / tl.where(amax > 0, amax, 1.0)[:, None]  # ‖q‖₂ = max|q|·‖q/max|q|‖₂: no under/overflow
        emul = zmul * amax * tl.sqrt(tl.sum(qs * qs, axis=1))  # (α−1)·scale·‖q‖₂ per row
        if ROT:
            emul = emul * (1.0 + rot_e)
        # Codes are read in chunks of CW bytes (int4: channel j in the low nibble of byte j, channel j + D/2
        # in the high one) and scored per channel group by int8 dots, q = s·(c1 + c2/128) + e with int8 c1,
        # c2; the e term (qerr per unit step) joins the bound.
        W: tl.constexpr = D if SRC == 1 else D // 2
        NGT: tl.constexpr = D // GS
        CWG: tl.constexpr = GS if GS >= 32 else 32  # int8 dots take K ≥ 32
        CW: tl.constexpr = W if CWG > W else CWG  # int4 with one step per token (TRANS): half a row
        CMAX: tl.constexpr = 127 if SRC == 1 else 7
        c1s, c2s, qmul, qerr = _qenc(
            qf, rot_e, zmul, RS, RS if TRANS else RP, D, W, GS, CW, CMAX, 16 if SRC == 2 else 1, PACK, ROT,
            TRANS,
        )  # fmt: skip
    if EARLY_Q:
        pdl_enter(PDL)
    if (want_mode < 0) & (sp == 0):
        tl.store(mode_ptr + bh, -want_mode)  # a pipeline's first kernel sets the group's mode
    mode = tl.load(mode_ptr + bh)
    # No valid position at or past vend (append semantics, kept by update_kernel; the capacity in the dense
    # pipeline): a pass that keeps segments deals [0, vend) out over its programs, so a short sequence in a
    # long cache is scanned by all of them (with the capacity's split, a 16K sequence in a 1M cache fell to
    # one program, whose segment overflowed: the group went to the workspace, 2.2 ms a step); a pass that
    # writes the workspace covers the capacity. Loaded with the mode, not after it.
    if SRC != 0 or not WRITE_WS:
        vend = tl.load(vend_ptr + bh)
        split = tl.minimum(tl.cdiv(tl.cdiv(vend, nsp), BLOCK_N) * BLOCK_N, split_len)  # ≤ a segment's range
        start = sp * split
        end = tl.minimum(start + split, vend)
    else:
        start = sp * split_len
        end = tl.minimum(start + split_len, S)
    if (want_mode < 0) | (mode == want_mode):
        bias_base = bias_ptr + b.to(tl.int64) * sbb
        if SRC == 0:
            k_base = k_ptr + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
            d = tl.arange(0, D)
        else:
            code_base = code_ptr + bh64 * sk_cap * W
            scale_base = scale_ptr + bh64 * sk_cap * NGT
            res_base = res_ptr + bh64 * sk_cap
        seg = bh64 * nsp + sp
        idx_base = seg_idx_ptr + seg * segcap
        zlo_base = seg_z_ptr + seg * 2 * R * segcap
        runmax = tl.full([RS], NEG_INF, tl.float32)
        lastv = tl.zeros([BLOCK_N], tl.int32)  # per tile column: reduced once, at the end
        known = tl.full([RS], NEG_INF, tl.float32)
        # The exchange's atomics run one per thread (XW slots, slot i for row i % RS, the first R live): an
        # atomic on fewer elements than threads hands its answer round through shared memory at once, so every
        # warp would wait for the L2 round trip right there (~15% of an int4 pass at 1M, by Nsight Compute).
        # Here the answers stay in their threads until the next exchange takes them, SYNC tiles later. A float
        # maximum is an int32 maximum on the bits of a value ≥ +0 and a uint32 minimum on those of a negative
        # one: both answers are kept, with the sign, and picked when taken (a select at once would wait too).
        XW: tl.constexpr = RS if RS > 128 else 128  # a 4-warp program's threads, or one slot per row
        xr = tl.arange(0, XW) % RS
        xlive = (tl.arange(0, XW) < RS) & (xr < R)
        gi = (gmax_ptr + bh64 * RP + xr).to(tl.pointer_type(tl.int32))
        gu = gi.to(tl.pointer_type(tl.uint32))
        ans_neg = xlive
        ans_i = tl.full([XW], NEG_INF, tl.float32).to(tl.int32, bitcast=True)
        ans_u = ans_i.to(tl.uint32, bitcast=True)
        it = tl.full([], 0, tl.int32)
        cnt = tl.full([], 0, tl.int32)
        nxt = start + tl.arange(0, BLOCK_N)
        bias_nxt = load_bias(bias_base, hq, qp, rmask, nxt, nxt < end, sbh, sbl, sbs, HAS_BIAS, BIAS_ROWS)
        if SRC != 0:
            meta_nxt = _sketch_meta(scale_base, res_base, nxt, nxt < end, NGT)
        for n0 in range(start, end, BLOCK_N):
            # Key and code tiles are pipelined by Triton (async copies through shared memory). The bias and
            # a sketch's steps and residuals — loads too narrow for async copies — are loaded a tile ahead by
            # hand, so no tile waits on them; exact key rows wait on their tile's bias (masked rows are never
            # read), sketch tiles are masked by range only.
            pos = n0 + tl.arange(0, BLOCK_N)
            inr = pos < end
            bias = bias_nxt
            tokv = tl.max(bias, axis=0) > NEG_INF if HAS_BIAS else inr
            nxt = pos + BLOCK_N
            bias_nxt = load_bias(bias_base, hq, qp, rmask, nxt, nxt < end, sbh, sbl, sbs, HAS_BIAS, BIAS_ROWS)
            if SRC == 0:
                kt = tl.load(
                    k_base + pos.to(tl.int64)[:, None] * sks + d[None, :], mask=tokv[:, None], other=0.0
                )
                zlo = mm(qc, tl.trans(cvt(kt, F32)), F32) * zmul + bias * bmul
                zhi = zlo
            else:
                steps, mstep, res = _tile_steps(meta_nxt, NGT)
                meta_nxt = _sketch_meta(scale_base, res_base, nxt, nxt < end, NGT)
                p64 = pos.to(tl.int64)
                if TRANS:
                    acc = tl.zeros([BLOCK_N, 4 * RT], tl.int32)  # every chunk adds its dots here
                else:
                    qk = tl.zeros([RS, BLOCK_N], tl.float32)
                for c in tl.static_range(W // CW):
                    x = tl.load(
                        code_base + p64[:, None] * W + c * CW + tl.arange(0, CW)[None, :],
                        mask=inr[:, None],
                        other=0,
                    )
                    if SRC == 2:  # 16·code of the low nibbles and of the high ones
                        x_lo, x_hi = _nibbles(x, ASM)
                    for h in tl.static_range(SRC):
                        y = x if SRC == 1 else (x_lo if h == 0 else x_hi)
                        if TRANS:
                            acc = tl.dot(y, c1s[c * SRC + h], acc, out_dtype=tl.int32)
                        else:
                            for j in tl.static_range(CW // GS):
                                qk = _group_score(
                                    qk, c1s, c2s, h * (W // GS) + c * (CW // GS) + j, y, steps, RS, PACK
                                )
                if TRANS:
                    qk = _trans_score(acc, steps[0], RT)
                live = bias > NEG_INF  # the sketch of a masked position may be anything, even NaN
                zc = tl.fma(qk, qmul[:, None], bias * bmul)
                # the bound: Σ_g ‖e_g‖₁·CMAX·step_g ≤ qerr·max step, plus ‖q‖₂·r; fma onto the dot's tile, so
                # the per-token vectors are brought to its layout (not the tile to theirs)
                zlo = tl.fma(-qerr[:, None], mstep[None, :], tl.fma(-emul[:, None], res[None, :], zc))
                zhi = tl.fma(qerr[:, None], mstep[None, :], tl.fma(emul[:, None], res[None, :], zc))
                zlo = tl.where(live, zlo, NEG_INF)
                zhi = tl.where(live, zhi, NEG_INF)
            if SRC == 0:
                tlo = tl.max(zlo, axis=1)
                thi = tlo
            else:
                tlo, thi = tl.reduce((zlo, zhi), 1, _max2)  # one exchange between warps for both
            runmax = tl.maximum(runmax, tlo)
            lastv = tl.maximum(lastv, tl.where(tokv, pos + 1, 0))
            if KEEP:
                if it % SYNC == 0:
                    ans = tl.where(
                        ans_neg, ans_u.to(tl.float32, bitcast=True), ans_i.to(tl.float32, bitcast=True)
                    )
                    ans = tl.reshape(tl.where(xlive, ans, NEG_INF), [XW // RS, RS])
                    known = tl.maximum(known, tl.max(ans, axis=0))
                    mine = tl.reshape(tl.broadcast_to(runmax[None, :], [XW // RS, RS]), [XW])
                    mine = mine.to(tl.int32, bitcast=True)
                    ans_neg = mine < 0
                    ans_i = tl.atomic_max(gi, mine, mask=xlive & ~ans_neg, sem="relaxed")
                    ans_u = tl.atomic_min(
                        gu, mine.to(tl.uint32, bitcast=True), mask=xlive & ans_neg, sem="relaxed"
                    )
                thr = tl.maximum(known, runmax) - 1.0
                if tl.max((thi > thr).to(tl.int32), axis=0) > 0:  # the tile keeps something (rare)
                    keep = tl.sum((zhi > thr[:, None]).to(tl.int32), axis=0) > 0
                    nk = tl.sum(keep.to(tl.int32), axis=0)
                    slot = cnt + tl.cumsum(keep.to(tl.int32), 0) - 1
                    ok = keep & (slot < segcap)
                    seg_store(idx_base, zlo_base, slot, ok, pos, zlo, zhi, segcap, r, rmask, R, SRC != 0)
                    cnt += nk
                it += 1
            if WRITE_WS:
                wptr = ws_ptr + (bh64 * R + r[:, None]) * S + pos[None, :]
                tl.store(wptr, zlo, mask=rmask[:, None] & inr[None, :])
        if KEEP and REFILTER:  # one last exchange (its answer covers every earlier one), then drop what the
            # final maximum rules out (an overflowed segment stays one)
            old = tl.atomic_max(gmax_ptr + bh64 * RP + r, runmax, mask=rmask, sem="relaxed")
            thr = tl.maximum(tl.where(rmask, old, NEG_INF), runmax)
            if cnt <= segcap:
                cnt = refilter(idx_base, zlo_base, cnt, segcap, thr - 1.0, r, rmask, R, SRC != 0, BLOCK_N)
        tl.store(seg_cnt_ptr + seg, cnt)
        tl.store(seg_max_ptr + seg * RP + r, runmax)
        tl.store(last_ptr + seg, tl.max(lastv))


@triton.jit
def _seg_block(idx_base, z_base, sl, m, r, rmask, segcap, R: tl.constexpr):
    """Positions and upper scores ``[RP, ·]`` of a segment's entries ``sl`` (where ``m``; −inf elsewhere)."""
    pos = tl.load(idx_base + sl, mask=m, other=0)
    zhi = tl.load(
        z_base + (R + r[:, None]) * segcap + sl[None, :], mask=rmask[:, None] & m[None, :], other=NEG_INF
    )
    return pos, zhi


@triton.jit
def cand_kernel(
    q_ptr,
    k_ptr,
    bias_ptr,
    seg_idx_ptr,
    seg_z_ptr,
    seg_cnt_ptr,
    seg_max_ptr,
    tau_low_ptr,
    mode_ptr,
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
    segcap,
    zmul,
    bmul,
    G: tl.constexpr,
    LQ: tl.constexpr,
    R: tl.constexpr,
    RP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_ROWS: tl.constexpr,
    F32: tl.constexpr,
    PDL: tl.constexpr,
):
    bh = tl.program_id(0)
    sp = tl.program_id(1)
    b = bh // Hkv
    kvh = bh % Hkv
    bh64 = bh.to(tl.int64)
    r, rmask, hq, qp = group_rows(kvh, G, LQ, R, RP)
    qc = cvt(load_q(q_ptr, b, hq, qp, rmask, sqb, sqh, sql, D), F32)
    pdl_enter(PDL)  # the query (an input of the op) before the wait: launch.py, EARLY
    seg = bh64 * tl.num_programs(1) + sp
    idx_base = seg_idx_ptr + seg * segcap
    z_base = seg_z_ptr + seg * 2 * R * segcap
    # the mode, τ_low, the count and the segment's first block are loaded at once (used only in mode 0), not
    # one after another: two round trips fewer before the key rows can be fetched
    mode = tl.load(mode_ptr + bh)
    tau_low = tl.load(tau_low_ptr + bh64 * RP + r, mask=rmask, other=float("inf"))
    n = tl.minimum(tl.load(seg_cnt_ptr + seg), segcap)
    sl = tl.arange(0, BLOCK_N)
    pos_nx, zhi_nx = _seg_block(idx_base, z_base, sl, sl < segcap, r, rmask, segcap, R)
    if mode == 0:
        k_base = k_ptr + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
        bias_base = bias_ptr + b.to(tl.int64) * sbb
        d = tl.arange(0, D)
        cnt = tl.full([], 0, tl.int32)
        zmax = tl.full([RP], NEG_INF, tl.float32)
        for s0 in range(0, n, BLOCK_N):
            sl = s0 + tl.arange(0, BLOCK_N)
            inr = sl < n
            pos, zhi = pos_nx, zhi_nx
            nx = sl + BLOCK_N
            pos_nx, zhi_nx = _seg_block(idx_base, z_base, nx, nx < n, r, rmask, segcap, R)
            cand = (tl.sum((zhi > tau_low[:, None]).to(tl.int32), axis=0) > 0) & inr
            bias = load_bias(bias_base, hq, qp, rmask, pos, cand, sbh, sbl, sbs, HAS_BIAS, BIAS_ROWS)
            kt = tl.load(k_base + pos.to(tl.int64)[:, None] * sks + d[None, :], mask=cand[:, None], other=0.0)
            z = mm(qc, tl.trans(cvt(kt, F32)), F32) * zmul + bias * bmul
            ci = cand.to(tl.int32)
            slot = cnt + tl.cumsum(ci, 0) - 1  # ≤ sl: compacting in place never overtakes the reads
            seg_store(idx_base, z_base, slot, cand, pos, z, z, segcap, r, rmask, R, False)
            cnt += tl.sum(ci)
            zmax = tl.maximum(zmax, tl.max(z, axis=1))
        tl.store(seg_cnt_ptr + seg, cnt)
        tl.store(seg_max_ptr + seg * RP + r, zmax)
