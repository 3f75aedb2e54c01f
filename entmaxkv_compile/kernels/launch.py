"""Launchers: static plans, buffers and the per-policy pipelines of kernel launches.

Everything here is sized once from static shapes (the cache capacity ``S``, not the current length), so a
decode step launches the same kernels on the same grids every time: no host sync, no length-dependent
``constexpr``, CUDA-graph capturable. Per-group *mode* (on device) routes each KV group:
0 = the sparse path (certified / top-k), 1 = dense from kept segments, 2 = dense from the workspace.

Pipelines (each launch early-exits for groups in another mode):

* ``dense``: score(exact, keep) → solve → [score(workspace) → solve(workspace)] → output; caches of at most
  ``WS_INLINE_MAX`` positions (with ``16·R ≤ D``) write the workspace in the first scoring pass and solve an
  overflowed group from it in the same solve launch, two launches fewer; so does a sparse pipeline's *dense
  tail* (the groups that fell back) at any length when ``min_context`` is 0 (``decode``)
* ``certified``: update(probes, sketch) → score(sketch, keep) → solve(τ_low) → cand → solve → dense tail →
  output(+ probes recorded)
* ``topk``: update(probes, boxes) → page scores → select → page gather → solve → dense tail → output(+ probes)
* ``adaptive``: as ``topk``, with the τ estimate between the page scores and the selection: page scores (+ per
  row bounds and centre entries) → τ estimate → drop the pages below it → select → …
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import EntmaxKVConfig
from ..reference.sketch import rotation_eps
from .meta import update_kernel
from .output import output_kernel
from .pages import (
    page_gather_kernel,
    page_pass_kernel,
    page_score_kernel,
    page_tau_kernel,
    select_hist_kernel,
    select_take_kernel,
)
from .score import cand_kernel, score_kernel
from .solve import solve_kernel

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
NVIDIA = not INTERPRET and torch.version.hip is None  # inline PTX and programmatic dependent launch
MAXIT = 100
SOLVE_BLOCK = 4096
SOLVE_CHUNK = 4096  # segment entries the solve reads per step (segments × entries of each)
OUT_SCAN = 1024
OUT_BLOCK = 32
OUT_SOLO = 64  # lists up to this long (a support, usually) are read by one program per row
SELECT_BLOCK = 1024
PASS_BLOCK = 256  # pages per tile of page_pass_kernel ([RP, PASS_BLOCK] bounds)
GATHER_TILE = 64  # tokens per page_gather_kernel tile (whole pages)
TAU_BLOCK = 4096  # page_tau_kernel: entries per block; a row compacted to this many finishes in registers
# page_tau_kernel: at most this many programs per row share the first pass (each holds ~217 registers, one
# program per SM: at 1M 16 took four waves, 42 µs; 4 took 24, one program per row 54)
TAU_SPLIT = 4
NO_CAP = 2**31 - 1
PAGED = ("topk", "adaptive")  # policies that select pages by their boxes
SKETCH_BITS = {"int8": 8, "int4": 4}
SKETCH_TILE = 32  # update_kernel's key rows per tile; a decode step's window takes min(this, p2(2·Lq))
PROBES = 8  # key rows per KV group re-read every step, so a rewritten cache (new sequence) is seen
# Scoring passes and the page gather run 4 warps capped at 128 registers (no spills on sm_90 under triton 3.6
# for 16-bit keys, groups of ≤ 16 rows, head dim 64–256, every sketch): 4 programs per SM, so a grid of 4·SMs
# programs is one wave (ops/cuda.py's PROGRAMS_PER_SM). fp32 keys and larger groups would spill under the cap:
# run uncapped; so does the gather for pages longer than its 64-row tile. (The gather, uncapped, took 168
# registers once its mapping became a loop: two waves, 1M top-k 1/16 59 → 97 µs.)
MAXNREG = 128
# Tiles between exchanges of the running maxima (score_kernel's SYNC; exact tiles are Plan.block_n tokens,
# sketch tiles Plan.block_sk); a program takes each answer at its next exchange, so a maximum reaches the
# others SYNC tiles late. A late maximum lets looser bounds overflow the segments: int4 exchanges every tile
# (every 2 tiles, answers 2 late: 128K went dense in 6–8 of 8 groups), int8 and exact passes every 2 tiles
# (4 and 8 cost 1–3% at 128K; ab_2026-11-30/).
SYNC_EXACT = 2
SYNC_SKETCH = {1: 2, 2: 1}
# Up to this cache capacity the exact scoring pass also writes the dense workspace (R·4 bytes per token
# against D·2 of K: ~6% more traffic at R = 4; only where it is ≤ 1/8 of K), which saves the two workspace
# launches on every step.
WS_INLINE_MAX = 65536
# Scoring programs drop what their final maximum rules out of their segment before they end (score_kernel's
# REFILTER): sketch passes always; exact passes up to this capacity — beyond it the extra code in the tile
# loop costs more than the shorter solve saves (1M dense 0.612 → 0.615 of SDPA, 128K 0.83 → 0.78).
REFILTER_EXACT_MAX = 262144
# Programmatic dependent launch where the GPU has it (sm_90+; see _pdl). The benchmark's --profile pass turns
# it off: a kernel launched early would count its wait for the predecessor as its own device time.
PDL = True
# EARLY (score_kernel, every launch but a pipeline's first; cand_kernel, page_score_kernel and
# page_gather_kernel always): the query side (loads, int8 levels) runs before the wait for the previous
# kernel, beside its tail (not the rotated sketches' q̃ = fl(R·q): update_kernel writes it). It reads only the
# op's inputs, and those are complete by then: each of these kernels lets its successor launch only after its
# own wait has returned, and a pipeline's first kernel waits for the op's producers before anything else.
# Pages per page-scoring tile and that kernel's pipeline depth (1M, 1/64: 193 µs at 16 pages and 3 stages →
# 123 µs at 32 and 2; with the empty-page selects gone from the tile loop 100 µs at 32 pages, 84 at 32 and 3
# stages, 78 at 64 and 2).
PAGE_TILE = 64
PAGE_STAGES = 2


@functools.lru_cache
def _pdl(device: torch.device, enabled: bool) -> dict:
    """Launch options for programmatic dependent launch: every kernel of a step waits for its predecessor at
    its first instruction and lets its successor launch at once, so each launch and prologue overlaps the
    previous kernel's tail (32K dense step −1.5 µs, 128K −3 µs; captured into CUDA graphs like any launch)."""
    on = enabled and NVIDIA and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}


def _p2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Plan:
    """Static sizes of one decode site (shapes, capacities, grids)."""

    b: int
    hkv: int
    g: int
    lq: int
    s: int
    d: int
    dv: int
    policy: str
    block_n: int
    nsplit: int
    split_len: int
    segcap: int
    capc: int
    nso: int
    sk: int  # 0: no sketch, 1: int8, 2: int4
    gs: int
    ps: int
    n_pages: int
    bp: int
    pages_per_split: int
    nsplit_p: int
    sel_cap: int
    nsplit_t: int
    segcap_t: int
    rot: bool  # the sketch is of R·k (EntmaxKVConfig.rotate_sketch)
    nsplit_tau: int  # adaptive: programs per row of page_tau_kernel's first pass

    @property
    def paged(self) -> bool:
        return self.policy in PAGED

    @property
    def bh(self) -> int:
        return self.b * self.hkv

    @property
    def r(self) -> int:
        return self.g * self.lq

    @property
    def rp(self) -> int:
        return max(16, _p2(self.r))

    def metadata_bytes_per_token(self, key_bytes: int) -> float:
        """Metadata read per cached token and KV group by one step (sketch or page boxes)."""
        if self.sk:
            return (self.d if self.sk == 1 else self.d // 2) + 2 * (self.d // self.gs) + 4
        if self.paged:
            return 2 * self.d * key_bytes / self.ps
        return 0.0

    @property
    def trans(self) -> bool:
        """One step per row: the sketch pass scores tokens along the dot's rows (``_trans_operands``)."""
        return self.sk != 0 and self.gs == self.d

    @property
    def rt(self) -> int:
        """Score rows of a ``trans`` sketch pass (its dot has ``4·rt ≥ 16`` columns); also the rows on which
        ``update_kernel`` rotates the queries (``RQ``)."""
        return max(4, _p2(self.r))

    @property
    def packed(self) -> bool:
        """The sketch pass packs both int8 query levels into one dot per channel group (``2·R ≤ RP``)."""
        return self.sk != 0 and 2 * self.r <= self.rp

    @property
    def block_sk(self) -> int:
        """Tokens per sketch tile: twice the exact tile for a packed pass (no spills at the register cap;
        int8 1M 0.556 → 0.486 of SDPA)."""
        return 2 * self.block_n if self.packed else self.block_n

    @property
    def ws_inline(self) -> bool:
        return self.s <= WS_INLINE_MAX and self.ws_cheap

    @property
    def ws_cheap(self) -> bool:
        """The workspace (R·4 bytes per position) is at most 1/8 of the key bytes a dense pass reads."""
        return 16 * self.r <= self.d

    @property
    def cap2(self) -> int:
        return max(self.nsplit * self.segcap, self.nsplit_t * self.segcap_t)


def make_plan(
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    dv: int,
    config: EntmaxKVConfig,
    n_programs: int,
    block_n: int | None = None,
) -> Plan:
    """Plan for ``q[B,Hq,Lq,D]``, ``k[B,Hkv,S,D]`` under ``config``; ``n_programs``: how many programs fill
    the GPU (the scoring grid never exceeds it); ``block_n``: tokens per exact scoring tile (default by head
    dim; int8 sketch tiles are ``Plan.block_sk``)."""
    b, hq, lq, d = q_shape
    hkv, s = k_shape[1], k_shape[2]
    config = config.resolve(s)  # "auto" → the concrete policy for this cache length
    bh = b * hkv
    bn = block_n or (64 if d <= 128 else 32)
    nsplit = max(1, min(n_programs // bh, _cdiv(s, bn)))  # at most one wave: no straggler wave
    # The solve scans the segments in [p2(nsplit), ·] chunks: round down to a power of two where that costs
    # at most 1/8 of the wave (66 segments would scan like 128; measured at 1M: solve 37 → 23 µs).
    p2 = 1 << (nsplit.bit_length() - 1)
    nsplit = p2 if 8 * p2 >= 7 * nsplit else nsplit
    split_len = _cdiv(_cdiv(s, nsplit), bn) * bn
    nsplit = _cdiv(s, split_len)
    capc = max(config.min_candidates, math.ceil(config.candidate_fraction * s))
    segcap = min(split_len, _cdiv(max(4 * bn, _cdiv(2 * capc, nsplit)), bn) * bn)
    r = (hq // hkv) * lq
    nso = max(1, min(64, _cdiv(3 * n_programs // 4, bh * r)))  # 3/4 of a wave: fewer partials to combine
    policy = config.policy
    sk = SKETCH_BITS[config.sketch] if policy == "certified" else 0
    sk = {0: 0, 8: 1, 4: 2}[sk]
    gs = max(16, min(config.group_size(d), d))
    ps = config.page_size
    n_pages = _cdiv(s, ps)
    bp = PAGE_TILE
    nsplit_p = max(1, min(_cdiv(n_programs, bh), _cdiv(n_pages, bp)))
    pages_per_split = _cdiv(_cdiv(n_pages, nsplit_p), bp) * bp
    nsplit_p = _cdiv(n_pages, pages_per_split)
    sel_cap = config.budget_pages + config.sink_pages + config.recent_pages
    nsplit_t = max(1, min(_cdiv(n_programs, bh), sel_cap))
    segcap_t = _cdiv(sel_cap, nsplit_t) * ps if policy in PAGED else 0
    nsplit_tau = max(1, min(_cdiv(n_pages, TAU_BLOCK), n_programs // (bh * r), TAU_SPLIT))
    nsplit_tau = _cdiv(n_pages, _cdiv(n_pages, nsplit_tau))  # no empty part
    return Plan(
        b, hkv, hq // hkv, lq, s, d, dv, policy, bn, nsplit, split_len, segcap, capc, nso, sk, gs, ps,
        n_pages, bp, pages_per_split, nsplit_p, sel_cap, nsplit_t, segcap_t, sk != 0 and config.rotate_sketch,
        nsplit_tau,
    )  # fmt: skip


class Scratch:
    """Per-call working memory of a plan (shareable by all sites with the same plan on one stream).

    Self-cleaning: the output kernel resets ``ticket`` and ``gmax`` so the next call finds them ready.
    """

    def __init__(self, plan: Plan, device: torch.device) -> None:
        p, dev = plan, device
        i32, f32 = torch.int32, torch.float32
        nseg = p.bh * p.nsplit
        self.seg_idx = torch.empty(nseg * p.segcap, dtype=i32, device=dev)
        self.seg_z = torch.empty(nseg * 2 * p.r * p.segcap, dtype=f32, device=dev)
        self.seg_cnt = torch.zeros(nseg, dtype=i32, device=dev)
        self.seg_max = torch.empty(nseg * p.rp, dtype=f32, device=dev)
        self.last = torch.zeros(p.bh * max(p.nsplit, p.nsplit_p), dtype=i32, device=dev)
        self.last_tail = torch.zeros(nseg, dtype=i32, device=dev)
        self.gmax = torch.full((p.bh * p.rp,), -math.inf, dtype=f32, device=dev)
        self.qrot = torch.empty(p.bh * p.r * p.d if p.rot else 1, dtype=f32, device=dev)  # R·q per step
        self.mode = torch.zeros(p.bh, dtype=i32, device=dev)
        self.capacity = torch.full((p.bh,), p.s, dtype=i32, device=dev)  # a pass's end without a site's vend
        self.tau_low = torch.zeros(p.bh * p.rp, dtype=f32, device=dev)
        self.tau = torch.zeros(p.bh * p.rp, dtype=f32, device=dev)
        rows = p.bh * p.r
        self.list_idx = torch.empty(rows * p.cap2, dtype=i32, device=dev)
        self.list_z = torch.empty(rows * p.cap2, dtype=f32, device=dev)
        self.list_n = torch.zeros(rows, dtype=i32, device=dev)
        self.ws = torch.empty(rows * p.s, dtype=f32, device=dev)
        self.part = torch.empty(rows * p.nso * p.dv, dtype=f32, device=dev)
        self.psum = torch.empty(rows * p.nso, dtype=f32, device=dev)
        self.pcnt = torch.empty(rows * p.nso, dtype=i32, device=dev)
        self.ticket = torch.zeros(rows, dtype=i32, device=dev)
        if p.paged:
            nt = p.bh * p.nsplit_t
            self.tseg_idx = torch.empty(nt * p.segcap_t, dtype=i32, device=dev)
            self.tseg_z = torch.empty(nt * 2 * p.r * p.segcap_t, dtype=f32, device=dev)
            self.tseg_cnt = torch.zeros(nt, dtype=i32, device=dev)
            self.tseg_max = torch.empty(nt * p.rp, dtype=f32, device=dev)
            self.pscore = torch.empty(p.bh * p.n_pages, dtype=f32, device=dev)
            self.sel = torch.empty(p.bh * p.n_pages, dtype=i32, device=dev)  # each slice's taken pages
            self.sel_list = torch.empty(p.bh * p.sel_cap, dtype=i32, device=dev)  # all of them, in order
            self.sel_hist = torch.zeros(p.bh * 4 * 256, dtype=i32, device=dev)
            self.sel_ties = torch.zeros(p.bh * p.nsplit_p * 256, dtype=i32, device=dev)
            self.sel_cnt = torch.zeros(p.bh * p.nsplit_p, dtype=i32, device=dev)
        if p.policy == "adaptive":  # per row and page: bound, τ-estimate entry and its token count
            self.urow = torch.empty(rows * p.n_pages, dtype=f32, device=dev)
            self.zc = torch.empty(rows * p.n_pages, dtype=f32, device=dev)
            self.nc = torch.empty(rows * p.n_pages, dtype=i32, device=dev)
            self.prank = torch.empty(p.bh * p.n_pages, dtype=f32, device=dev)  # scores of passing pages
            self.zcmax = torch.empty(p.bh * p.nsplit_p * p.rp, dtype=f32, device=dev)  # per slice and row
            self.tau_part = torch.empty(rows * p.nsplit_tau * 2, dtype=f32, device=dev)  # page_tau's parts
            self.tau_pcnt = torch.empty(rows * p.nsplit_tau, dtype=i32, device=dev)
            self.tau_ticket = torch.zeros(rows, dtype=i32, device=dev)  # reset by the last program


def selected_pages(plan: Plan, scratch: Scratch, group: int) -> Tensor:
    """The pages the last ``topk``/``adaptive`` step of ``plan`` selected for KV group ``group`` (ascending):
    the slices' lists (``select_take_kernel``) in order. Reads the device (a sync: for tests and tools)."""
    cnt = scratch.sel_cnt[group * plan.nsplit_p :][: plan.nsplit_p].tolist()
    sel = scratch.sel[group * plan.n_pages :][: plan.n_pages]
    return torch.cat([sel[i * plan.pages_per_split :][:n] for i, n in enumerate(cnt)]).long()


class SiteBuffers:
    """Persistent per-site metadata (sized at the cache capacity) and the last step's statistics.

    ``wm[B·Hkv]``: one past the last valid position seen (−1: rebuild on the next call).
    ``candidates[B·Hkv]``: exact key rows gathered (certified: candidates; topk/adaptive: the selected pages'
    positions); ``mode[B·Hkv]``: how each group was
    decoded (0 sparse, 1 dense, 2 dense via the workspace); ``support[B·Hq·Lq]``: support size per row.
    """

    def __init__(self, plan: Plan, device: torch.device, key_dtype: torch.dtype) -> None:
        p, dev = plan, device
        self.wm = torch.full((p.bh,), -1, dtype=torch.int32, device=dev)
        self.vend = torch.full((p.bh,), p.s, dtype=torch.int32, device=dev)
        self.candidates = torch.zeros(p.bh, dtype=torch.int32, device=dev)
        self.mode = torch.zeros(p.bh, dtype=torch.int32, device=dev)
        self.support = torch.zeros(p.bh * p.r, dtype=torch.int32, device=dev)
        self.probe_pos = torch.zeros(p.bh * PROBES, dtype=torch.int32, device=dev)
        self.probe_rows = torch.zeros(p.bh * PROBES * p.d, dtype=key_dtype, device=dev)
        if p.sk:
            width = p.d if p.sk == 1 else p.d // 2
            self.codes = torch.empty(p.bh * p.s * width, dtype=torch.int8, device=dev)
            self.scales = torch.empty(p.bh * p.s * (p.d // p.gs), dtype=torch.float16, device=dev)
            self.res = torch.empty(p.bh * p.s, dtype=torch.float32, device=dev)
        if p.paged:
            self.kmin = torch.empty(p.bh * p.n_pages * p.d, dtype=key_dtype, device=dev)
            self.kmax = torch.empty(p.bh * p.n_pages * p.d, dtype=key_dtype, device=dev)


def _bias_args(bias: Tensor | None, q: Tensor) -> tuple[Tensor, tuple[int, int, int, int], int]:
    """(tensor, broadcast strides ``(b, h, l, s)``, BIAS_ROWS) of the additive fp32 bias."""
    if bias is None:
        return q, (0, 0, 0, 0), 1
    st = tuple(0 if bias.shape[i] == 1 else bias.stride(i) for i in range(3)) + (bias.stride(3),)
    rows = 1 if st[1] == 0 and (q.shape[2] == 1 or st[2] == 0) else 0
    return bias, st, rows


class Step:
    """One decode step's launch arguments (tensors, strides, scalars) for a plan."""

    def __init__(
        self, plan: Plan, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float, alpha: float
    ) -> None:
        self.p = plan
        self.q, self.k, self.v = q, k, v
        self.bias, self.bst, self.bias_rows = _bias_args(bias, q)
        self.has_bias = bias is not None
        self.pdl = _pdl(q.device, PDL)
        self.zmul = (alpha - 1.0) * scale
        self.bmul = alpha - 1.0
        self.beta = 1.0 / (alpha - 1.0)
        self.rot_eps = rotation_eps(plan.d) if plan.rot else 0.0
        self.mode = 2 if alpha == 2.0 else 1 if alpha == 1.5 else 0
        self.f32 = INTERPRET or q.dtype == torch.float32
        self.out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)

    def common(self) -> dict:
        p = self.p
        return dict(G=p.g, LQ=p.lq, R=p.r, RP=p.rp)

    def qkb(self) -> tuple:
        q, k = self.q, self.k
        return (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), *self.bst)

    def bias_flags(self) -> dict:
        return dict(HAS_BIAS=self.has_bias, BIAS_ROWS=self.bias_rows)


def _reg_cap(st: Step) -> dict:
    """The register cap (``MAXNREG``) where it spills nothing."""
    return {"maxnreg": MAXNREG} if not (INTERPRET or st.f32) and st.p.rp <= 16 else {}


def _score_launch(st: Step, sk: int) -> dict:
    return {"num_warps": 4, "SYNC": SYNC_SKETCH[sk] if sk else SYNC_EXACT, **_reg_cap(st)}


def _score(
    st: Step,
    sc: Scratch,
    want_mode: int,
    *,
    sketch: SiteBuffers | None = None,
    vend: Tensor | None = None,
    ws: bool = False,
    ws_too: bool = False,
) -> None:
    """Score every token of each group in ``want_mode`` (−1: all groups, set to mode 1): positions ``[0,
    vend)`` (per group, no valid position past it: the sketch's, else ``vend``, else the capacity) dealt out
    over the programs, or every position of the capacity for a pass that writes the workspace.

    ``sketch`` given: from its key sketch, with bounds (``last`` feeds the watermark); ``ws``: write the
    dense workspace instead of keeping segments; ``ws_too``: write it as well."""
    p, q = st.p, st.q
    sk = p.sk if sketch is not None else 0
    meta = (sketch.codes, sketch.scales, sketch.res, sc.qrot) if sketch is not None else (q, q, q, q)
    last = sc.last if sketch is not None else sc.last_tail
    vend = sketch.vend if sketch is not None else sc.capacity if vend is None else vend
    score_kernel[(p.bh, p.nsplit)](
        q, st.k, st.bias, *meta, sc.seg_idx, sc.seg_z, sc.seg_cnt, sc.seg_max, last, sc.gmax, sc.ws,
        sc.mode, vend, *st.qkb(), p.hkv, p.s, p.s, p.split_len, p.segcap, st.zmul, st.bmul, st.rot_eps,
        want_mode,
        D=p.d, BLOCK_N=p.block_sk if sk else p.block_n, SRC=sk, GS=p.gs, PACK=bool(sk) and p.packed,
        TRANS=bool(sk) and p.trans, RT=p.rt, EARLY=want_mode >= 0,
        KEEP=not ws, WRITE_WS=ws or ws_too, REFILTER=bool(sk) or p.s <= REFILTER_EXACT_MAX,
        ASM=NVIDIA, ROT=bool(sk) and p.rot, F32=st.f32, **st.pdl, **st.common(), **st.bias_flags(),
        **_score_launch(st, sk),
    )  # fmt: skip


def _solve(
    st: Step,
    sc: Scratch,
    want_mode: int,
    ovf_mode: int,
    tau: Tensor,
    *,
    segs: tuple[Tensor, Tensor, Tensor, Tensor, int, int] | None = None,
    capc: int = NO_CAP,
    cand: Tensor | None = None,
    from_ws: bool = False,
    min_ctx: int = 0,
    nlast: int = 0,
    ws_inline: bool = False,
) -> None:
    p = st.p
    idx, z, cnt, mx, nseg, segcap = segs or (sc.seg_idx, sc.seg_z, sc.seg_cnt, sc.seg_max, p.nsplit, p.segcap)
    nseg_p2 = _p2(nseg)
    sb = max(16, min(_p2(segcap), SOLVE_CHUNK // nseg_p2))  # a segment never holds more than segcap
    solve_kernel[(p.bh, p.r)](
        idx, z, cnt, mx, sc.ws, sc.list_idx, sc.list_z, sc.list_n, tau, sc.mode,
        cand if cand is not None else sc.list_n, sc.last, nlast, min_ctx, p.s, nseg, segcap, p.cap2, capc,
        st.beta, want_mode, ovf_mode, R=p.r, RP=p.rp, NSEG_P2=nseg_p2, SB=sb,
        BLOCK=SOLVE_BLOCK, FROM_WS=from_ws, COUNT_CAND=cand is not None, MODE=st.mode, MAXIT=MAXIT,
        NL_P2=_p2(max(nlast, 1)), WS_INLINE=ws_inline, SUPPORT_ONLY=tau is sc.tau, num_warps=8, **st.pdl,
    )  # fmt: skip


def _dense(st: Step, sc: Scratch, first: bool, inline: bool, vend: Tensor | None = None) -> None:
    """Groups in mode 1 (all groups if ``first``) decode densely from kept segments; those whose segments
    overflow, from the dense workspace (mode 2). ``inline``: the scoring pass writes the workspace as it goes
    and the solve of an overflowed group reads it at once (two launches fewer), writing every position of the
    capacity (see ``decode`` for where that is cheap). ``vend``: the site's end of the valid positions (a
    sparse pipeline's update kernel keeps it), so a short sequence's tail scans its length on all programs."""
    _score(st, sc, -1 if first else 1, vend=vend, ws_too=inline)
    _solve(st, sc, 1, 2, sc.tau, ws_inline=inline)
    if not inline:
        _score(st, sc, 2, ws=True)
        _solve(st, sc, 2, 2, sc.tau, from_ws=True)


def _output(st: Step, sc: Scratch, site: SiteBuffers, nlast: int) -> None:
    """The output (rows of a non-finite query: NaN); with ``nlast`` (a sparse pipeline) it also advances the
    watermarks and records the probes."""
    p, v, out = st.p, st.v, st.out
    output_kernel[(p.bh * p.r, p.nso)](
        st.q, st.k, v, out, sc.ws, sc.list_idx, sc.list_z, sc.list_n, sc.tau, sc.mode, sc.part, sc.psum,
        sc.pcnt, sc.ticket, sc.gmax, site.support, site.mode, site.wm, sc.last, site.probe_pos,
        site.probe_rows, *st.qkb()[:6], v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1),
        out.stride(2), p.hkv, p.s, p.cap2, st.beta, nlast,
        DK=p.d, DV=p.dv, BLOCK=OUT_BLOCK, SCAN=OUT_SCAN, NSO_P2=_p2(p.nso), NL_P2=_p2(max(nlast, 1)),
        MODE=st.mode, HAS_WM=nlast > 0, SOLO=OUT_SOLO, P=PROBES, **st.common(), **st.pdl,
    )  # fmt: skip


def _update(st: Step, site: SiteBuffers, sc: Scratch) -> None:
    p, k = st.p, st.k
    box = p.paged
    sk = (site.codes, site.scales, site.res) if p.sk else (site.wm,) * 3
    update_kernel[(p.bh, p.nsplit)](
        k, st.bias, site.wm, site.vend, sc.mode, *sk, st.q, sc.qrot, site.kmin if box else k,
        site.kmax if box else k, sc.sel_hist if box else sc.mode, site.probe_pos, site.probe_rows,
        *st.qkb()[:3], k.stride(0), k.stride(1), k.stride(2), *st.bst, p.hkv, p.s, p.s, p.n_pages,
        st.rot_eps,
        D=p.d, GS=p.gs, SK=p.sk, BOX=box, PS=p.ps, BT=SKETCH_TILE, BTW=min(SKETCH_TILE, _p2(2 * p.lq)),
        RQ=p.rt, BPG=max(1, 64 // p.ps), P=PROBES, ROT=p.rot,
        **st.common(), **st.bias_flags(), **st.pdl,
    )  # fmt: skip


def decode(
    plan: Plan,
    scratch: Scratch,
    site: SiteBuffers,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Tensor | None,
    scale: float,
    alpha: float,
    config: EntmaxKVConfig,
) -> Tensor:
    """One decode step of ``plan.policy``; returns ``out[B,Hq,Lq,Dv]`` (``q.dtype``).

    ``q``, ``k``, ``v`` need a unit stride on their last dim; ``bias`` is fp32 ``[B|1,Hq|1,Lq|1,S]``.
    """
    p, sc = plan, scratch
    config = config.resolve(k.shape[2])
    st = Step(p, q, k, v, bias, scale, alpha)
    if p.policy == "dense":
        _dense(st, sc, True, p.ws_inline)
        _output(st, sc, site, 0)
        return st.out
    _update(st, site, sc)
    if p.policy == "certified":
        _score(st, sc, 0, sketch=site)
        _solve(st, sc, 0, 1, sc.tau_low, min_ctx=config.min_context, nlast=p.nsplit)
        cand_kernel[(p.bh, p.nsplit)](
            q, k, st.bias, sc.seg_idx, sc.seg_z, sc.seg_cnt, sc.seg_max, sc.tau_low, sc.mode, *st.qkb(),
            p.hkv, p.segcap, st.zmul, st.bmul, D=p.d, BLOCK_N=p.block_n, F32=st.f32,
            **st.common(), **st.bias_flags(), **st.pdl,
        )  # fmt: skip
        _solve(st, sc, 0, 1, sc.tau, capc=p.capc, cand=site.candidates)
        nlast = p.nsplit
    else:
        adapt = p.policy == "adaptive"
        rowp = (sc.urow, sc.zc, sc.nc, sc.zcmax) if adapt else (sc.pscore,) * 4
        page_score_kernel[(p.bh, p.nsplit_p)](
            q, site.kmin, site.kmax, st.bias, sc.pscore, sc.last, sc.sel_hist, *rowp, q.stride(0),
            q.stride(1), q.stride(2), *st.bst, p.hkv, p.s, p.n_pages, p.n_pages, p.pages_per_split, st.zmul,
            st.bmul, 2.0 * (2 * p.d + 4) * 2.0**-24, D=p.d, PS=p.ps, BP=p.bp, F32=st.f32, HB=SELECT_BLOCK,
            ADAPT=adapt, num_stages=PAGE_STAGES, **st.common(), **st.bias_flags(), **st.pdl,
        )  # fmt: skip
        if adapt:
            page_tau_kernel[(p.bh, p.r, p.nsplit_tau)](
                sc.zc, sc.nc, sc.zcmax, sc.tau_low, sc.tau_part, sc.tau_pcnt, sc.tau_ticket, p.n_pages,
                p.n_pages, p.nsplit_p, _cdiv(p.n_pages, p.nsplit_tau), st.beta, R=p.r, RP=p.rp, MODE=st.mode,
                BLOCK=TAU_BLOCK, NL_P2=_p2(p.nsplit_p), NT_P2=_p2(p.nsplit_tau), MAXIT=MAXIT,
                num_warps=8, **st.pdl,
            )  # fmt: skip
            page_pass_kernel[(p.bh, p.nsplit_p)](
                sc.pscore, sc.prank, sc.urow, sc.tau_low, sc.sel_hist, p.n_pages, p.n_pages,
                p.pages_per_split, config.adaptive_slack, R=p.r, RP=p.rp, BLOCK=PASS_BLOCK, HB=SELECT_BLOCK,
                **st.pdl,
            )  # fmt: skip
        sel_args = (sc.prank if adapt else sc.pscore, sc.last, sc.sel_hist, sc.sel_ties)
        sizes = (p.n_pages, p.n_pages)
        for rnd in range(1, 4):
            select_hist_kernel[(p.bh, p.nsplit_p)](
                *sel_args, *sizes, p.nsplit_p, config.budget_pages, config.min_context, p.pages_per_split,
                RND=rnd, BLOCK=SELECT_BLOCK, NL_P2=_p2(p.nsplit_p), **st.pdl,
            )  # fmt: skip
        select_take_kernel[(p.bh, p.nsplit_p)](
            *sel_args, sc.sel_cnt, sc.sel, sc.mode, sc.pscore, *sizes, p.nsplit_p, config.budget_pages,
            config.sink_pages, config.recent_pages, config.min_context, p.pages_per_split, PS=p.ps,
            BLOCK=SELECT_BLOCK, NL_P2=_p2(p.nsplit_p), RANKED=adapt, **st.pdl,
        )  # fmt: skip
        page_gather_kernel[(p.bh, p.nsplit_t)](
            q, k, st.bias, sc.sel, sc.sel_cnt, sc.sel_list, site.candidates, sc.tseg_idx, sc.tseg_z,
            sc.tseg_cnt, sc.tseg_max, sc.gmax, *st.qkb(), p.hkv, p.s, p.n_pages, p.nsplit_p,
            p.pages_per_split, p.sel_cap, p.segcap_t, st.zmul, st.bmul, D=p.d, PS=p.ps,
            BPG=max(1, GATHER_TILE // p.ps), NL_P2=_p2(p.nsplit_p), MAP=max(1, 4096 // _p2(p.nsplit_p)),
            F32=st.f32, num_warps=4, **(_reg_cap(st) if p.ps <= GATHER_TILE else {}), **st.common(),
            **st.bias_flags(), **st.pdl,
        )  # fmt: skip
        segs = (sc.tseg_idx, sc.tseg_z, sc.tseg_cnt, sc.tseg_max, p.nsplit_t, p.segcap_t)
        _solve(st, sc, 0, 1, sc.tau, segs=segs)
        nlast = p.nsplit_p
    # A sparse pipeline's dense tail runs for the groups that fell back: with min_context = 0 only after an
    # overflow, which a long sequence causes (its pass reads the keys of most of the capacity anyway), so it
    # writes the workspace inline at any cache length; with min_context > 0 (auto: 128K) it may run on every
    # step for a short sequence in a long cache, where writing the whole capacity's workspace would cost more
    # than the two launches it saves (review, fourteenth session).
    _dense(st, sc, False, p.ws_inline or (config.min_context == 0 and p.ws_cheap), site.vend)
    _output(st, sc, site, nlast)
    return st.out
