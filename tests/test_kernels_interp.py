"""Every Triton kernel pipeline on CPU tensors through the Triton interpreter, against the reference.

Small shapes (B·Hkv ≤ 4, S ≤ 256, tens of programs). ``tests/conftest.py`` sets ``TRITON_INTERPRET``
on machines without a GPU before any kernel module is imported; the module skips on a GPU machine
(the kernels are compiled there: tests/gpu/) and when Triton or numpy is missing.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

pytest.importorskip("numpy", reason="the Triton interpreter needs numpy")
pytest.importorskip("triton", reason="Triton is not installed")

from entmaxkv_compile.config import EntmaxKVConfig  # noqa: E402
from entmaxkv_compile.kernels import launch  # noqa: E402
from entmaxkv_compile.kernels.launch import (  # noqa: E402
    INTERPRET,
    Scratch,
    SiteBuffers,
    Step,
    _score,
    _update,
    decode,
    make_plan,
    selected_pages,
)
from entmaxkv_compile.ops import cuda as ops_cuda  # noqa: E402
from entmaxkv_compile.reference.decode import decode_attention, dense_decode  # noqa: E402

if not INTERPRET:
    pytest.skip("kernels are compiled for the GPU here (TRITON_INTERPRET unset)", allow_module_level=True)

NEG = -math.inf
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}  # the interpreter truncates to bf16


def _inputs(b, hkv, g, lq, s, d, dtype, *, seed=0, peaky=True, dv=None):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, lq, d, generator=gen)
    k = torch.randn(b, hkv, s, d, generator=gen)
    v = torch.randn(b, hkv, s, dv or d, generator=gen)
    if peaky:  # a few keys aligned with the queries, like real attention (the rest stay far below τ)
        for h in range(hkv):
            idx = torch.randint(0, s, (6,), generator=gen)
            k[:, h, idx] += 0.6 * q[:, h * g : (h + 1) * g, 0].mean(1, keepdim=True)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _mask(b, s, lengths, lq=1):
    """Additive mask [B, 1, Lq, S]: row b sees positions < lengths[b] (causal over its Lq queries)."""
    bias = torch.zeros(b, 1, lq, s)
    for i, n in enumerate(lengths):
        for j in range(lq):
            bias[i, 0, j, n - lq + j + 1 :] = NEG
    return bias


def _run(policy, q, k, v, bias, alpha, *, n_programs=8, block_n=16, **cfg):
    config = EntmaxKVConfig(policy=policy, **cfg)
    plan = make_plan(tuple(q.shape), tuple(k.shape), v.shape[-1], config, n_programs, block_n)
    site = SiteBuffers(plan, q.device, k.dtype)
    out = decode(plan, Scratch(plan, q.device), site, q, k, v, bias, q.shape[-1] ** -0.5 * 2, alpha, config)
    return out, site, config


def _err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(
    "shape,alpha,dtype,bias_kind",
    [
        ((1, 2, 2, 1, 200, 64), 1.5, torch.float32, "mask"),  # GQA, a masked tail
        ((1, 2, 2, 1, 200, 64), 2.0, torch.float16, "mask"),
        ((1, 2, 2, 1, 200, 64), 1.3, torch.float32, "none"),  # generic α, no bias
        ((2, 2, 1, 1, 160, 128), 1.5, torch.bfloat16, "mask"),  # MHA, per-row lengths
        ((1, 1, 4, 1, 256, 64), 2.0, torch.float32, "alibi"),  # MQA, per-head ALiBi + mask
        ((1, 2, 2, 2, 128, 64), 1.5, torch.float32, "mask"),  # Lq = 2 (speculative), causal rows
    ],
)
def test_dense_matches_reference(shape, alpha, dtype, bias_kind):
    b, hkv, g, lq, s, d = shape
    q, k, v = _inputs(b, hkv, g, lq, s, d, dtype)
    bias = None
    if bias_kind != "none":
        bias = _mask(b, s, [s - 7 - 29 * i for i in range(b)], lq)
    if bias_kind == "alibi":
        slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])[:, None, None]
        bias = bias + slopes * (torch.arange(s) - s)[None, None, None, :].float()
    out, site, _ = _run("dense", q, k, v, bias, alpha)
    ref = dense_decode(q, k, v, scale=d**-0.5 * 2, alpha=alpha, bias=bias)
    assert _err(out, ref) < TOL[dtype]
    assert site.mode.tolist() == [1] * (b * hkv)


@pytest.mark.parametrize("policy", ["dense", "certified"])
@pytest.mark.parametrize("inline", [True, False])
def test_dense_support_sizes_and_workspace_fallback(policy, inline, monkeypatch):
    """A group that overflows its dense segments (certified: its candidates first, then its dense tail's
    segments) decodes from the workspace. ``inline``: the scoring pass writes it and the solve uses it at once
    (caches ≤ WS_INLINE_MAX), else a second pass writes it — except in certified's tail, which writes it
    inline at any length when ``min_context`` is 0 (the next test: not otherwise)."""
    monkeypatch.setattr(launch, "WS_INLINE_MAX", 1 << 40 if inline else 0)
    q, k, v = _inputs(1, 2, 2, 1, 256, 64, torch.float32, peaky=False)
    q[:, :2] *= 1e-2  # KV head 0: every score within 1 of the maximum, all 256 tokens in the support
    out, site, cfg = _run(
        policy, q, k, v, None, 1.5, n_programs=2, sketch="int4", min_candidates=8, candidate_fraction=0.01
    )
    ref, stats = decode_attention(q, k, v, scale=64**-0.5 * 2, alpha=1.5, config=cfg)
    assert _err(out, ref) < 1e-5
    # head 0 overflowed its segments (certified: its candidates first) and used the workspace
    assert site.mode.tolist() == [2, 1]
    assert site.support.tolist() == stats.support_size.flatten().tolist()


@pytest.mark.parametrize("chunk", [4096, 16])
@pytest.mark.parametrize("policy,alpha", [("dense", 1.5), ("dense", 1.25), ("certified", 2.0)])
def test_long_lists_solve_from_the_bracket(monkeypatch, policy, alpha, chunk):
    """Segments longer than the solve's chunk (``chunk`` 16: read in two passes, histogram then the entries
    above τ₀) or within one (4096: solved in registers), with the solve block shrunk to 16 so that lists
    above τ₀ longer than it stream Newton from memory (KV head 0: every score equal, all 256 tokens in the
    support): τ, the output and the support sizes stay exact."""
    import triton.language as tl

    from entmaxkv_compile.kernels import common

    monkeypatch.setattr(launch, "SOLVE_BLOCK", 16)
    monkeypatch.setattr(launch, "SOLVE_CHUNK", chunk)
    monkeypatch.setattr(common, "SOLVE_SMALL", tl.constexpr(16))  # else lists ≤ 512 never stream
    q, k, v = _inputs(1, 2, 2, 1, 256, 64, torch.float32, seed=3, peaky=False)
    q = q * 0.35  # every score within 1 of the maximum: segments of ~64 entries per row
    q[:, :2] = 0.0
    out, site, cfg = _run(
        policy, q, k, v, None, alpha, n_programs=4, min_candidates=256, candidate_fraction=1.0
    )
    ref, stats = decode_attention(q, k, v, scale=64**-0.5 * 2, alpha=alpha, config=cfg)
    assert _err(out, ref) < 1e-5
    assert site.mode.tolist() == [0 if policy == "certified" else 1] * 2
    assert site.support.tolist() == stats.support_size.flatten().tolist()
    assert stats.support_size[0, :2].tolist() == [[256], [256]]


@pytest.mark.parametrize(  # one step per token row or several (one int8 dot per channel group); rotated
    "sketch,group,rot",
    [("int8", 16, False), ("int4", 16, False), ("int8", 64, False), ("int4", 32, False), ("int4", 64, True),
     ("int8", 64, True)],
)  # fmt: skip
@pytest.mark.parametrize("alpha", [1.5, 2.0, 1.25])
def test_certified_is_exact(sketch, group, rot, alpha):
    q, k, v = _inputs(2, 2, 2, 1, 192, 64, torch.float32, seed=1)
    bias = _mask(2, 192, [192, 150])
    out, site, cfg = _run(
        "certified", q, k, v, bias, alpha, sketch=sketch, sketch_group=group, sketch_rotation=rot,
        min_candidates=32, candidate_fraction=0.5,
    )  # fmt: skip
    ref, stats = decode_attention(q, k, v, scale=64**-0.5 * 2, alpha=alpha, bias=bias, config=cfg)
    assert _err(out, dense_decode(q, k, v, scale=64**-0.5 * 2, alpha=alpha, bias=bias)) < 1e-5
    sparse = site.mode == 0
    assert sparse.all() or sketch == "int4"  # int8 certifies at this capacity; loose int4 may fall back
    support = stats.support_size.reshape(4, 2).amax(-1).int()
    assert (site.candidates[sparse] >= support[sparse]).all() and (site.candidates[sparse] > 0).all()
    assert site.wm.tolist() == [192, 192, 150, 150]


def _kept(sc: Scratch, plan, seg: int) -> tuple[Tensor, Tensor]:
    """Segment ``seg`` of a scoring pass: kept positions ``[n]`` and bounds ``[2 (lo, hi), R, n]``."""
    n, r = int(sc.seg_cnt[seg]), plan.r
    pos = sc.seg_idx[seg * plan.segcap :][:n].long()
    z = sc.seg_z[seg * 2 * r * plan.segcap :][: 2 * r * plan.segcap].view(2, r, plan.segcap)[..., :n]
    return pos, z


def _two_level_residual(x: Tensor) -> Tensor:
    """What ``score_kernel`` leaves of a query row after its two int8 levels on one step per row
    (``x − s·c1 − (s/128)·c2``, ``s = max|x|/127``)."""
    a = x.abs().max()
    s = a / 127 if a > 1e-30 else torch.ones_like(a)
    for step in (s, s / 128):
        x = x - torch.floor(x / step + 0.5) * step
    return x


def _assert_sketch_bounds(
    q: Tensor, k: Tensor, sketch: str, group: int, scale: float, rot: bool = False
) -> SiteBuffers:
    """Scores ``k`` from its sketch (of ``R·k`` if ``rot``) with ``scale`` small enough that every token lies
    within 1 of the maximum, so every token is kept with its bounds; each bound must contain the exact score
    (strictly: the bound covers fp32 rounding). Returns the site (its sketch)."""
    (_, hq, _, d), (_, hkv, s, _) = q.shape, k.shape
    g, alpha = hq // hkv, 1.5
    cfg = EntmaxKVConfig(
        policy="certified", sketch=sketch, sketch_group=group, sketch_rotation=rot, candidate_fraction=1.0,
        min_candidates=s,
    )  # fmt: skip
    plan = make_plan(tuple(q.shape), tuple(k.shape), d, cfg, 4, 16)
    site, sc = SiteBuffers(plan, q.device, k.dtype), Scratch(plan, q.device)
    st = Step(plan, q, k, k, None, scale, alpha)
    _update(st, site, sc)
    _score(st, sc, 0, sketch=site)
    exact = (
        (alpha - 1)
        * scale
        * torch.einsum("hd,hsd->hs", q[0, :, 0].double(), k[0].double().repeat_interleave(g, 0))
    )
    seen = 0
    for seg in range(plan.bh * plan.nsplit):
        pos, z = _kept(sc, plan, seg)
        kvh, z = seg // plan.nsplit, z.double()
        want = exact[kvh * g : (kvh + 1) * g][:, pos]
        assert (z[0] <= want).all() and (z[1] >= want).all()
        seen += len(pos)
    assert seen == plan.bh * s
    return site


@pytest.mark.parametrize(
    "sketch,group", [("int8", 64), ("int4", 32), ("int8", 16), ("int4", 16), ("int4", 64)]
)
@pytest.mark.parametrize("qmag", [1.0, 1e-25])  # tiny queries: Σq² underflows unless the norm is scaled
def test_sketch_bounds_contain_the_exact_scores(sketch, group, qmag):
    """Keys the sketch holds exactly (no residual beyond the fp32 allowance), so the bound must carry all
    the rest of the kernel's error: the query's two-level int8 rounding. Half the keys
    are worst cases for it (``±qmax`` with the sign of the first row's rounding residual), which the
    rounding allowance alone does not cover (outlier channel: ‖q‖₂ ≈ max|q|)."""
    qmax, hkv, g, s, d = (127 if sketch == "int8" else 7), 2, 2, 96, 64
    gen = torch.Generator().manual_seed(3)
    q = 0.1 * torch.randn(1, hkv * g, 1, d, generator=gen)
    q[..., 5] = 10.0
    q *= qmag
    codes = torch.randint(-qmax, qmax + 1, (1, hkv, s, d), generator=gen)
    for h in range(hkv):
        codes[0, h, ::2] = qmax * torch.sign(_two_level_residual(q[0, h * g, 0])).long()
    codes[..., ::group] = qmax  # every channel group reaches qmax: its step is exactly 1/8
    k = codes / 8.0
    site = _assert_sketch_bounds(q, k, sketch, group, 1e-3)
    assert site.res.max() < 0.01  # only the fp32 rounding allowance: the sketch is exact


@pytest.mark.parametrize("sketch,group", [("int8", 64), ("int4", 32), ("int4", 64)])
def test_sketch_bounds_hold_for_huge_queries(sketch, group):
    """max|q| = 1e37 at D = 64 (D·max|q| overflows fp32) and keys so small that every fp16 step is 0: the
    whole key is in the residual and the query-rounding term must stay finite (∞·0 made the bounds NaN and
    dropped every token)."""
    q, k, v = _inputs(1, 2, 2, 1, 64, 64, torch.float32, seed=3)
    q, k = q * 1e37, k / 1e37
    out, site, _ = _run(
        "certified", q, k, v, None, 1.5, sketch=sketch, sketch_group=group, sketch_rotation=group == 64,
        min_candidates=16,
    )  # fmt: skip
    assert not site.scales.any()
    assert _err(out, dense_decode(q, k, v, scale=64**-0.5 * 2, alpha=1.5)) < 1e-5


@pytest.mark.parametrize("sketch,group,rot", [("int8", 64, False), ("int4", 32, False), ("int4", 64, True)])
def test_sketch_bounds_for_tiny_keys(sketch, group, rot):
    """Keys of 1e-37 against queries of 1e37: every fp16 step is 0, so the whole key is the residual, whose
    squares underflow — summed unscaled, the residual was 0 and the bounds [0, 0] missed scores of ±0.01
    (found in review). Every token is kept with its bounds; each must contain the exact score."""
    q, k, _ = _inputs(1, 2, 2, 1, 64, 64, torch.float32, seed=3)
    site = _assert_sketch_bounds(q * 1e37, k / 1e37, sketch, group, 1e-3, rot=rot)
    assert not site.scales.any() and (site.res > 0).all()


@pytest.mark.parametrize("side", ["query", "key"])
def test_rotated_sketch_with_rows_near_the_fp32_range(side):
    """Every channel 1e37 with one sign (‖x‖₂ = 8e37 at D = 64): a butterfly that summed before scaling
    reached 6.4e38 = ∞ and made every bound NaN (found in review); a key row of 1e38 (‖k‖₂ past the fp32
    range, R·k meets ∞ − ∞) must stay a candidate with an infinite residual, not drop out as NaN."""
    q, k, v = _inputs(1, 2, 2, 1, 64, 64, torch.float32, seed=3)
    if side == "query":
        q, k = torch.full_like(q, 1e37), k / 1e37
    else:
        q, k = q * 1e-37, k.clone()
        k[0, :, 5] = 1e38  # ‖k‖₂ = 8e38: past the fp32 range
    out, site, _ = _run(
        "certified", q, k, v, None, 1.5, sketch="int4", sketch_rotation=True, min_candidates=16
    )
    assert _err(out, dense_decode(q, k, v, scale=64**-0.5 * 2, alpha=1.5)) < 1e-5
    assert not site.res.isnan().any()


@pytest.mark.parametrize("sketch,group", [("int8", 32), ("int4", 32), ("int4", 16)])
def test_sketch_bounds_with_unequal_group_steps(sketch, group):
    """Channel groups of very different magnitude (so every token's group steps differ by up to 10⁴):
    each group's integer dot must be scaled by its own step — the bounds must contain the exact scores of
    every token (a step applied to the wrong group breaks this, where keys with equal steps would not)."""
    hkv, g, s, d = 2, 2, 64, 64
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, hkv * g, 1, d, generator=gen)
    mag = 10.0 ** (4 * torch.rand(1, hkv, s, d // group, 1, generator=gen) - 2)
    k = (torch.randn(1, hkv, s, d // group, group, generator=gen) * mag).reshape(1, hkv, s, d)
    _assert_sketch_bounds(q, k, sketch, group, 1e-4)


@pytest.mark.parametrize("sketch", ["int8", "int4"])
def test_rotated_sketch_bounds(sketch):
    """Keys with two outlier channels (8× the rest): the rotated sketch (one step per token) must bound
    every exact score, and spread the outliers so its residuals are far below the unrotated sketch's."""
    hkv, g, s, d = 2, 2, 64, 64
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, hkv * g, 1, d, generator=gen)
    k = torch.randn(1, hkv, s, d, generator=gen)
    k[..., 3] *= 8.0
    k[..., 40] *= -8.0
    rotated = _assert_sketch_bounds(q, k, sketch, d, 1e-4, rot=True)
    plain = _assert_sketch_bounds(q, k, sketch, d, 1e-4, rot=False)
    assert rotated.res.mean() < 0.5 * plain.res.mean()


def test_auto_config_reaches_the_kernels_resolved():
    """``make_plan`` and ``decode`` resolve ``auto`` themselves (a short cache: the dense pipeline)."""
    q, k, v = _inputs(1, 2, 2, 1, 128, 64, torch.float32, seed=3)
    out, site, config = _run("auto", q, k, v, None, 1.5)
    plan = make_plan(tuple(q.shape), tuple(k.shape), 64, config, 8, 16)
    assert plan.policy == "dense" and not hasattr(site, "codes") and not hasattr(site, "kmin")
    assert _err(out, dense_decode(q, k, v, scale=64**-0.5 * 2, alpha=1.5)) < 1e-5


@pytest.mark.parametrize("policy", ["dense", "certified"])
def test_segments_end_filtered_by_the_final_maximum(policy):
    """Each program's peak sits in its last tile, so its early tiles keep background within 1 of a low
    running maximum; at the end the program drops what its final maximum rules out. Segments must then hold
    only entries some row can still use, and every token within 1 of its row's maximum (the superset)."""
    b, hkv, g, s, d = 1, 2, 2, 256, 64
    q, k, _ = _inputs(b, hkv, g, 1, s, d, torch.float32, seed=5, peaky=False)
    for h in range(hkv):  # the last position of each program's range: a key far above the rest
        k[0, h, 63::64] += 3.0 * q[0, h * g : (h + 1) * g, 0].mean(0)
    cfg = EntmaxKVConfig(policy=policy, candidate_fraction=1.0, min_candidates=s)
    plan = make_plan(tuple(q.shape), tuple(k.shape), d, cfg, 8, 16)
    assert plan.nsplit == 4 and plan.split_len == 64
    site, sc = SiteBuffers(plan, q.device, k.dtype), Scratch(plan, q.device)
    st = Step(plan, q, k, k, None, d**-0.5, 1.5)
    if policy == "dense":
        _score(st, sc, -1)
    else:
        _update(st, site, sc)
        _score(st, sc, 0, sketch=site)
    exact = 0.5 * d**-0.5 * torch.einsum("hd,hsd->hs", q[0, :, 0], k[0].repeat_interleave(g, 0))
    hi = 0 if policy == "dense" else 1  # exact passes keep z; sketch passes also keep the upper bound
    for grp in range(plan.bh):
        rows = exact[grp * g : (grp + 1) * g]
        kept = set()
        for seg in range(grp * plan.nsplit, (grp + 1) * plan.nsplit):
            pos, z = _kept(sc, plan, seg)
            own = sc.seg_max[seg * plan.rp :][: plan.r]
            assert 0 < len(pos) < plan.split_len // 4  # background was kept early, then dropped
            assert (z[hi] > own[:, None] - 1.0).any(0).all()
            kept |= set(pos.tolist())
        need = (rows > rows.max(1, keepdim=True).values - 1.0).any(0).nonzero().flatten().tolist()
        assert set(need) <= kept


def test_segment_end_filter_fills_its_gap_from_the_tail():
    """Each program's first tile is background (kept: the running maximum is low), then a peak and 47
    positions within 1 of it. The end filter drops the first block, stops at the clean block after it and
    moves the segment's last entries into the gap: every segment must end as exactly the 48 useful
    positions, once each."""
    s, d, scale = 256, 64, 0.125
    q = torch.randn(1, 1, 1, d, generator=torch.Generator().manual_seed(7))
    t = torch.rand(s, generator=torch.Generator().manual_seed(8))  # background z in [0, 0.9)
    t = 0.9 * t
    t[16::64] = 10.0
    for p0 in range(0, s, 64):
        t[p0 + 17 : p0 + 64] = torch.linspace(9.2, 9.9, 47)
    k = (t[:, None] * q[0, 0, 0] / (q.square().sum() * 0.5 * scale)).reshape(1, 1, s, d)  # z = t
    cfg = EntmaxKVConfig(policy="dense", candidate_fraction=1.0, min_candidates=s)
    plan = make_plan(tuple(q.shape), tuple(k.shape), d, cfg, 4, 16)
    assert plan.nsplit == 4 and plan.split_len == 64
    sc = Scratch(plan, q.device)
    _score(Step(plan, q, k, k, None, scale, 1.5), sc, -1)
    for seg in range(plan.nsplit):
        pos, _ = _kept(sc, plan, seg)
        assert sorted(pos.tolist()) == list(range(64 * seg + 16, 64 * seg + 64))


def test_topk_segments_hold_what_can_be_in_the_support():
    """The exact scores of the selected pages keep only tokens within 1 of the group's maximum over the
    selection (all of those, and nothing a segment's own maximum rules out), and the output still matches."""
    b, hkv, g, s, d = 1, 2, 2, 256, 64
    q, k, v = _inputs(b, hkv, g, 1, s, d, torch.float32, seed=9, peaky=False)
    cfg = EntmaxKVConfig(policy="topk", page_size=8, budget_pages=12, sink_pages=1, recent_pages=1)
    plan = make_plan(tuple(q.shape), tuple(k.shape), d, cfg, 16, 16)
    site, sc = SiteBuffers(plan, q.device, k.dtype), Scratch(plan, q.device)
    scale = d**-0.5 * 2
    out = decode(plan, sc, site, q, k, v, None, scale, 1.5, cfg)
    ref, _ = decode_attention(q, k, v, scale=scale, alpha=1.5, bias=None, config=cfg)
    assert _err(out, ref) < 1e-5
    z = 0.5 * scale * torch.einsum("hd,hsd->hs", q[0, :, 0], k[0].repeat_interleave(g, 0))
    kept_total = 0
    for grp in range(plan.bh):
        pages = selected_pages(plan, sc, grp)
        assert int(site.candidates[grp]) == 8 * len(pages)  # the statistics' gathered key rows
        pos = (pages[:, None] * 8 + torch.arange(8)).flatten()
        rows = z[grp * g : (grp + 1) * g][:, pos]
        need = set(pos[(rows > rows.max(1, keepdim=True).values - 1.0).any(0)].tolist())
        kept = set()
        for seg in range(grp * plan.nsplit_t, (grp + 1) * plan.nsplit_t):
            n = int(sc.tseg_cnt[seg])
            idx = sc.tseg_idx[seg * plan.segcap_t :][:n].long()
            zs = sc.tseg_z[seg * 2 * plan.r * plan.segcap_t :][: plan.r * plan.segcap_t].view(plan.r, -1)[
                :, :n
            ]
            own = sc.tseg_max[seg * plan.rp :][: plan.r]
            assert (zs > own[:, None] - 1.0).any(0).all()
            kept |= set(idx.tolist())
        assert need <= kept and len(kept) < len(pos) // 2
        kept_total += len(kept)
    assert kept_total > 0


@pytest.mark.parametrize("policy", ["dense", "certified", "topk", "adaptive"])
def test_scratch_is_clean_for_the_next_call(policy, monkeypatch):
    """Two calls on one Scratch, the second with much lower scores: the first call's running maxima must be
    gone (else the end-of-program filters drop the second call's support). The first call's short supports
    take the one-program output, the second's flat rows the ticketed one; both leave ``gmax`` at −inf and the
    tickets at 0 (``adaptive``: also the τ estimate's, its first pass split in 4-entry blocks)."""
    monkeypatch.setattr(launch, "TAU_BLOCK", 4)
    q, k, v = _inputs(1, 2, 2, 1, 128, 64, torch.float32, seed=2)
    cfg = EntmaxKVConfig(
        policy=policy, min_candidates=128, candidate_fraction=1.0, page_size=8, budget_pages=8
    )
    plan = make_plan(tuple(q.shape), tuple(k.shape), 64, cfg, 16, 16)
    assert plan.nso > 1
    site, sc = SiteBuffers(plan, q.device, k.dtype), Scratch(plan, q.device)
    for mul, solo in ((1.0, True), (0.05, False)):
        out = decode(plan, sc, site, q * mul, k, v, None, 0.25, 1.5, cfg)
        ref, stats = decode_attention(q * mul, k, v, scale=0.25, alpha=1.5, config=cfg)
        assert _err(out, ref) < 1e-5
        assert site.support.tolist() == stats.support_size.flatten().tolist()
        assert (site.support <= launch.OUT_SOLO).all() == solo
        assert torch.isneginf(sc.gmax.view(plan.bh, plan.rp)[:, : plan.r]).all() and not sc.ticket.any()
        if policy == "adaptive":
            assert plan.nsplit_tau > 1 and not sc.tau_ticket.any()


def test_topk_step_interrupted_after_the_page_scoring(monkeypatch):
    """A step that stops after the page scoring (here: the gather launch raises) leaves the first radix
    round's counts in the selection's histograms; the next step must start them from zero again (the update
    kernel clears them) and select what the reference selects."""
    q, k, v = _inputs(1, 2, 2, 1, 512, 64, torch.float32, seed=5)
    cfg = EntmaxKVConfig(policy="topk", page_size=4, budget_pages=8)
    plan = make_plan(tuple(q.shape), tuple(k.shape), 64, cfg, 16, 16)
    site, sc = SiteBuffers(plan, q.device, k.dtype), Scratch(plan, q.device)

    class Interrupted:
        def __getitem__(self, grid):
            raise RuntimeError("interrupted")

    monkeypatch.setattr(launch, "page_gather_kernel", Interrupted())
    with pytest.raises(RuntimeError, match="interrupted"):
        decode(plan, sc, site, q, k, v, None, 0.25, 1.5, cfg)
    assert sc.sel_hist.any()  # what the interrupted step left
    monkeypatch.undo()
    out = decode(plan, sc, site, q, k, v, None, 0.25, 1.5, cfg)
    ref, _ = decode_attention(q, k, v, scale=0.25, alpha=1.5, config=cfg)
    assert _err(out, ref) < 1e-5


@pytest.mark.parametrize("policy,sketch", [("dense", "int8"), ("certified", "int4")])
def test_long_splits_exchange_maxima_every_few_tiles(policy, sketch):
    """One program per group scanning 16–32 tiles: the shared running maximum is exchanged only every
    ``SYNC`` tiles and read a tile late, and the peak sits in a late tile (early tiles keep more)."""
    q, k, v = _inputs(1, 2, 2, 1, 512, 64, torch.float32, seed=4, peaky=False)
    k[:, :, 460] += 2.0 * q[:, ::2, 0]  # the largest scores appear only after most tiles
    bias = _mask(1, 512, [500])
    out, site, _ = _run(
        policy, q, k, v, bias, 1.5, n_programs=2, sketch=sketch, min_candidates=64, candidate_fraction=0.5
    )
    assert _err(out, dense_decode(q, k, v, scale=64**-0.5 * 2, alpha=1.5, bias=bias)) < 1e-5
    assert site.mode.tolist() == ([1, 1] if policy == "dense" else [0, 0])


@pytest.mark.parametrize("policy,sketch", [("dense", "int8"), ("certified", "int8"), ("certified", "int4")])
def test_exchange_of_negative_maxima(policy, sketch):
    """Every score far below zero (a −40 bias on every position), four programs per group: the running maxima
    the programs exchange are negative, which a float ``atomic_max`` publishes as an unsigned minimum on the
    bits; an answer taken from the wrong half would read as ≥ +0 and drop every token."""
    q, k, v = _inputs(1, 2, 2, 1, 1024, 64, torch.float32, seed=5)
    bias = _mask(1, 1024, [1000]) - 40.0
    out, site, _ = _run(policy, q, k, v, bias, 1.5, sketch=sketch, min_candidates=64, candidate_fraction=0.5)
    assert _err(out, dense_decode(q, k, v, scale=64**-0.5 * 2, alpha=1.5, bias=bias)) < 1e-5
    assert site.mode.tolist() == ([1, 1] if policy == "dense" else [0, 0])


@pytest.mark.parametrize("policy,sketch", [("dense", "int8"), ("certified", "int8"), ("certified", "int4")])
def test_group_of_256_rows(policy, sketch):
    """MQA with 64 query heads and Lq = 4: a group's 256 rows outnumber a scoring program's 128 threads (the
    running-maximum exchange then takes one slot per row)."""
    q, k, v = _inputs(1, 1, 64, 4, 48, 64, torch.float32, seed=1)
    out, site, _ = _run(policy, q, k, v, None, 1.5, n_programs=4, sketch=sketch, candidate_fraction=1.0)
    assert _err(out, dense_decode(q, k, v, scale=64**-0.5 * 2, alpha=1.5)) < 1e-5
    assert site.mode.tolist() == ([1] if policy == "dense" else [0])


@pytest.mark.parametrize("policy", ["dense", "certified"])
def test_non_finite_query_rows_are_nan(policy):
    """A query row holding a NaN or ±inf gives a NaN output row, as eager entmax does (the kernels' own
    answer would be finite); every other row stays exact."""
    q, k, v = _inputs(1, 2, 2, 1, 128, 64, torch.float32, seed=6)
    q[0, 1, 0, 3] = math.nan
    q[0, 2, 0, 0] = -math.inf
    out, _, cfg = _run(policy, q, k, v, None, 1.5)
    ok = [0, 3]
    ref, _ = decode_attention(q[:, ok], k.repeat_interleave(2, 1)[:, ok], v.repeat_interleave(2, 1)[:, ok],
                              scale=64**-0.5 * 2, alpha=1.5, config=cfg)  # fmt: skip
    assert out[0, 1:3].isnan().all()
    assert _err(out[:, ok], ref) < 1e-5


@pytest.mark.parametrize("policy", ["topk", "adaptive"])
@pytest.mark.parametrize("case", ["shared_bias", "per_head_bias", "causal_lq2"])
def test_non_finite_query_row_leaves_the_page_ranking_to_its_group(policy, case):
    """A NaN query row's output is NaN and it takes no part in its group's page ranking: its bounds at +inf
    (as they were) made every page tie, so the group's other rows read the first pages, in the reference; the
    kernels, where a maximum propagates NaN (the interpreter), ranked pages by NaN (review, fourteenth
    session). With a per-row bias the row may see pages no other row sees (a head's mask, the newest of
    Lq = 2 causal rows): they must not be selected for it either (review, fifteenth session: the kernels gave
    the row a finite copy of another row's query over its own bias). The other rows match the reference."""
    scale = 64**-0.5 * 2
    kw = dict(page_size=16, budget_pages=2, sink_pages=0, recent_pages=1 if case == "shared_bias" else 0)
    if case == "shared_bias":
        q, k, v = _inputs(1, 2, 2, 1, 256, 64, torch.float32, seed=6)
        q[0, 1, 0, 3] = math.nan
        bias, bad = None, (0, 1, 0)
    elif case == "per_head_bias":  # head 0 sees [0, 128), head 1 (NaN) every position
        q, k, v = _inputs(1, 1, 2, 1, 256, 64, torch.float32, seed=7)
        k[0, 0, 128:] += 1.5 * q[0, 0, 0]  # what head 0 cannot see scores high for its query
        q[0, 1, 0, 3] = math.nan
        bias = torch.zeros(1, 2, 1, 256)
        bias[0, 0, 0, 128:] = NEG
        bad = (0, 1, 0)
    else:  # MHA, Lq = 2 causal: the newest row (NaN) alone sees position 160, the first of page 10
        q, k, v = _inputs(1, 1, 1, 2, 256, 64, torch.float32, seed=8)
        k[0, 0, 160] += 3 * q[0, 0, 0]  # scores high for the finite row's query, which cannot see it
        q[0, 0, 1, 3] = math.nan
        bias, bad = _mask(1, 256, [161], lq=2), (0, 0, 1)
    out, _, cfg = _run(policy, q, k, v, bias, 1.5, **kw)
    ref, _ = decode_attention(q, k, v, scale=scale, alpha=1.5, bias=bias, config=cfg)
    assert out[bad].isnan().all() and ref[bad].isnan().all()
    fin = ~out.isnan().any(-1)
    assert fin.sum() == out[..., 0].numel() - 1
    assert _err(out[fin], ref[fin]) < 1e-5
    if case == "shared_bias":  # group 0 ranked by its finite row alone
        first, _ = decode_attention(q[:, :1], k[:, :1], v[:, :1], scale=scale, alpha=1.5, config=cfg)
        assert _err(out[:, :1], first) < 1e-5


def test_certified_over_capacity_falls_back_per_group():
    q, k, v = _inputs(1, 2, 2, 1, 256, 64, torch.bfloat16, seed=2)
    q[:, 2:] = 0.0  # KV head 1: flat scores, every token a candidate
    out, site, _ = _run(
        "certified", q, k, v, None, 1.5, sketch="int4", min_candidates=16, candidate_fraction=0.1
    )
    assert _err(out, dense_decode(q, k, v, scale=64**-0.5 * 2, alpha=1.5)) < TOL[torch.bfloat16]
    assert site.mode.tolist()[1] == 1


@pytest.mark.parametrize(  # bf16: the interpreter holds it as uint16 bits (a page test on raw loads saw
    # kmin = −1 > kmax = 0.5 and took non-empty pages for empty ones)
    "page_size,alpha,lengths,dtype",
    [
        (16, 1.5, [250, 256], torch.float32),
        (8, 2.0, [97, 200], torch.float32),
        (16, 1.5, [250, 256], torch.bfloat16),
    ],
)
def test_topk_matches_reference(page_size, alpha, lengths, dtype):
    q, k, v = _inputs(2, 2, 2, 1, 256, 64, dtype, seed=3)
    bias = _mask(2, 256, lengths)
    k_masked_nan = k.clone()  # masked keys play no part, whatever they hold (the last, partial page is read)
    for i, n in enumerate(lengths):
        k_masked_nan[i, :, n:] = math.nan
    out, site, cfg = _run(
        "topk", q, k_masked_nan, v, bias, alpha, page_size=page_size, budget_pages=3, recent_pages=1
    )
    ref, _ = decode_attention(q, k, v, scale=64**-0.5 * 2, alpha=alpha, bias=bias, config=cfg)
    assert _err(out, ref) < max(TOL[dtype], 1e-5)
    assert site.mode.tolist() == [0] * 4


@pytest.mark.parametrize(
    "shape,alpha,dtype,bias_kind,slack",
    [
        ((2, 2, 2, 1, 256, 64), 1.5, torch.float32, "mask", 0.0),  # GQA, per-row lengths
        ((2, 2, 2, 1, 256, 64), 2.0, torch.bfloat16, "mask", 0.3),
        ((1, 2, 2, 1, 200, 64), 1.3, torch.float32, "none", 0.0),  # generic α, a partial last page
        ((1, 1, 4, 1, 256, 64), 1.5, torch.float32, "alibi", 0.0),  # MQA, per-head ALiBi: per-row entries
        ((1, 2, 2, 1, 256, 64), 1.5, torch.float32, "holes", 0.0),  # a third of each page masked: counts
        ((1, 2, 2, 2, 256, 64), 2.0, torch.float16, "mask", 0.1),  # Lq = 2, causal rows
    ],
)
@pytest.mark.parametrize("tau_block,tau_split,programs", [(4096, 4, 8), (16, 4, 8), (4, 4, 8), (4, 3, 32)])
def test_adaptive_selects_the_reference_pages(
    shape, alpha, dtype, bias_kind, slack, tau_block, tau_split, programs, monkeypatch
):
    """``adaptive``: the τ estimate from page-box centres drops pages before the budget does; the kernels
    select exactly the reference's pages (per-row counts and biases included) and match its output — with
    the estimate solved in registers (one block), after a first pass by one or two programs per row (16-entry
    blocks over 32 pages), through the compacting passes after it (4-entry blocks), and with the first pass
    split three ways (parts of 11 entries; four times the gather programs)."""
    from entmaxkv_compile.reference.decode import _page_selection, adaptive_tau_estimate, attention_scores
    from entmaxkv_compile.reference.pages import page_metadata

    monkeypatch.setattr(launch, "TAU_BLOCK", tau_block)
    monkeypatch.setattr(launch, "TAU_SPLIT", tau_split)

    b, hkv, g, lq, s, d = shape
    q, k, v = _inputs(b, hkv, g, lq, s, d, dtype, seed=11)
    gen = torch.Generator().manual_seed(12)  # keys clustered by page (narrow boxes, spread centres)
    centres = torch.randn(b, hkv, s // 8, 1, d, generator=gen).expand(-1, -1, -1, 8, -1)
    k = (0.1 * k.float() + centres.flatten(2, 3)).to(dtype)
    bias = None if bias_kind == "none" else _mask(b, s, [s - 3 - 70 * i for i in range(b)], lq)
    if bias_kind == "alibi":
        bias = bias + torch.tensor([0.5, 0.25, 0.125, 0.0625])[:, None, None] * (torch.arange(s) - s).float()
    if bias_kind == "holes":
        bias[..., torch.arange(s) % 3 == 1] = NEG
    cfg = dict(page_size=8, budget_pages=24, sink_pages=1, recent_pages=1, adaptive_slack=slack)
    config = EntmaxKVConfig(policy="adaptive", **cfg)
    plan = make_plan(tuple(q.shape), tuple(k.shape), d, config, programs, 16)
    assert programs == 8 or plan.nsplit_tau == 3
    site, sc = SiteBuffers(plan, q.device, k.dtype), Scratch(plan, q.device)
    scale = d**-0.5 * 2
    out = decode(plan, sc, site, q, k, v, bias, scale, alpha, config)
    ref, _ = decode_attention(q, k, v, scale=scale, alpha=alpha, bias=bias, config=config)
    assert _err(out, ref) < max(TOL[dtype], 1e-5)
    assert site.mode.tolist() == [0] * plan.bh
    sc_ref = attention_scores(q, k, scale=scale, bias=bias)
    valid = (sc_ref > NEG).reshape(b, -1, s).any(1)
    tau = adaptive_tau_estimate(q, *page_metadata(k, 8, valid), sc_ref, scale, alpha, bias, 8)
    got_tau = sc.tau_low.view(plan.bh, plan.rp)[:, : plan.r]
    torch.testing.assert_close(got_tau, tau.reshape(plan.bh, plan.r), rtol=1e-5, atol=1e-5)
    want, _, _ = _page_selection(q, k, sc_ref, valid, scale, alpha, bias, config)
    want = want.reshape(plan.bh, -1)
    topk, _, _ = _page_selection(q, k, sc_ref, valid, scale, alpha, bias, config.replace(policy="topk"))
    assert (want.sum(-1) < topk.reshape(plan.bh, -1).sum(-1)).any()  # the estimate dropped pages
    for grp in range(plan.bh):
        got = selected_pages(plan, sc, grp)
        assert got.tolist() == want[grp].nonzero()[:, 0].tolist()
        assert int(site.candidates[grp]) == 8 * len(got)  # the statistics' gathered key rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_page_scores_of_empty_pages_are_masked(monkeypatch, dtype):
    """Pages whose boxes are empty (``kmin = +inf``, ``kmax = −inf``) although the bias lets them through —
    the public API never makes them, so they are planted between the update and the page scoring — score
    −inf (their inf/NaN stays in their own column of the dots), and every other page scores
    ``(α−1)·max_rows u`` of the reference's bound on the same boxes."""
    from entmaxkv_compile.reference.pages import page_upper_bound

    q, k, v = _inputs(1, 2, 16, 1, 256, 64, dtype, seed=4)  # 16 rows: no padded row hides a NaN bound
    cfg = EntmaxKVConfig(policy="topk", page_size=4, budget_pages=8)
    plan = make_plan(tuple(q.shape), tuple(k.shape), 64, cfg, 8, 16)
    site, sc = SiteBuffers(plan, q.device, k.dtype), Scratch(plan, q.device)
    empty = torch.zeros(plan.bh, plan.n_pages, dtype=torch.bool)
    empty[0, [0, 5, 33, 63]] = True  # first, last and pages inside one tile and slice
    empty[1, 10:14] = True
    real = launch.page_score_kernel

    class Planting:
        def __getitem__(self, grid):
            def run(*args, **kw):
                for box, fill in ((site.kmin, math.inf), (site.kmax, -math.inf)):
                    box.view(plan.bh, plan.n_pages, plan.d)[empty] = fill
                return real[grid](*args, **kw)

            return run

    monkeypatch.setattr(launch, "page_score_kernel", Planting())
    decode(plan, sc, site, q, k, v, None, 0.25, 1.5, cfg)
    kmin = site.kmin.view(1, plan.hkv, plan.n_pages, plan.d)
    kmax = site.kmax.view(1, plan.hkv, plan.n_pages, plan.d)
    u = page_upper_bound(q, kmin, kmax, 0.25, None, 4)  # [1, Hq, 1, P]
    want = 0.5 * u.view(plan.hkv, plan.g, plan.n_pages).amax(1)
    got = sc.pscore.view(plan.bh, plan.n_pages)
    assert torch.isneginf(got[empty]).all() and torch.isneginf(want[empty]).all()
    torch.testing.assert_close(got[~empty], want[~empty], rtol=1e-5, atol=1e-5)


def test_topk_split_selection_breaks_ties_to_lowest_pages(monkeypatch):
    """Eight page slices per group select in parallel; most pages tie exactly (identical keys), so the cut
    falls inside a tie run that spans slices and the lowest tied pages must win, as in the reference (the
    ties before a slice come from the other slices' last-round histograms)."""
    monkeypatch.setattr(launch, "PAGE_TILE", 16)  # 16-page slices: eight of them over 128 pages
    q, k, v = _inputs(1, 2, 2, 1, 512, 64, torch.float32, seed=6, peaky=False)
    k[:] = k[:, :, :1]  # every key of a group equal: all 128 pages tie
    for h, pages in ((0, (37, 90, 101)), (1, (5, 64, 127))):
        for pg in pages:  # three pages clearly above the ties
            k[:, h, 4 * pg + 1] += q[:, 2 * h : 2 * h + 2, 0].mean(1)
    bias = _mask(1, 512, [509])
    cfg = dict(page_size=4, budget_pages=9, sink_pages=1, recent_pages=2)
    out, site, config = _run("topk", q, k, v, bias, 1.5, n_programs=16, **cfg)
    plan = make_plan(tuple(q.shape), tuple(k.shape), 64, config, 16, 16)
    assert plan.nsplit_p == 8
    ref, _ = decode_attention(q, k, v, scale=64**-0.5 * 2, alpha=1.5, bias=bias, config=config)
    assert _err(out, ref) < 1e-5
    assert site.mode.tolist() == [0, 0]


def test_min_context_runs_dense():
    q, k, v = _inputs(1, 2, 2, 1, 128, 64, torch.float32, seed=4)
    bias = _mask(1, 128, [100])
    for policy in ("certified", "topk", "adaptive"):
        out, site, _ = _run(policy, q, k, v, bias, 1.5, min_context=101)
        assert _err(out, dense_decode(q, k, v, scale=64**-0.5 * 2, alpha=1.5, bias=bias)) < 1e-5
        assert site.mode.tolist() == [1, 1]


def test_dense_tail_of_a_long_cache_leaves_the_workspace_alone(monkeypatch):
    """A group below ``min_context`` takes the dense tail on every step; in a cache too long for the inline
    workspace (``WS_INLINE_MAX``) the tail's scoring pass must not write the workspace (it would write every
    position of the capacity, every step) unless a group overflows its segments."""
    monkeypatch.setattr(launch, "WS_INLINE_MAX", 0)
    q, k, v = _inputs(1, 2, 2, 1, 128, 64, torch.float32, seed=4)
    bias = _mask(1, 128, [40])
    cfg = EntmaxKVConfig(policy="certified", min_context=101)
    plan = make_plan(tuple(q.shape), tuple(k.shape), 64, cfg, 8, 16)
    site, sc = SiteBuffers(plan, q.device, k.dtype), Scratch(plan, q.device)
    sc.ws.fill_(7.0)
    out = decode(plan, sc, site, q, k, v, bias, 64**-0.5 * 2, 1.5, cfg)
    assert _err(out, dense_decode(q, k, v, scale=64**-0.5 * 2, alpha=1.5, bias=bias)) < 1e-5
    assert site.mode.tolist() == [1, 1]
    assert bool((sc.ws == 7.0).all())


@pytest.mark.parametrize("policy", ["certified", "topk"])
def test_dense_tail_below_min_context_stepped_stops_at_the_sequence(policy, monkeypatch):
    """A short sequence in a long cache under ``min_context`` takes the dense tail on every step; once the
    update kernel has seen the sequence, the tail scans up to its end (``vend``), not the capacity (a cache
    past ``WS_INLINE_MAX``: a pass that writes the workspace writes it whole), and stays exact as tokens are
    appended (fails if the bound drops the newest token)."""
    monkeypatch.setattr(launch, "WS_INLINE_MAX", 0)
    q, k, v = _inputs(1, 2, 2, 1, 96, 64, torch.float32, seed=5)
    cfg = EntmaxKVConfig(policy=policy, page_size=8, budget_pages=2, min_candidates=16, min_context=200)
    scale = q.shape[-1] ** -0.5 * 2
    for length in (40, 41, 42, 43):
        for h in range(2):  # the newest token carries most of the attention
            k[0, h, length - 1] = 3 * q[0, 2 * h : 2 * h + 2, 0].mean(0)
        bias = _mask(1, 96, [length])
        out = ops_cuda.decode_site(q, k, v, bias, scale, 1.5, 11, cfg, n_programs=4, block_n=16)
        ref = dense_decode(q, k, v, scale=scale, alpha=1.5, bias=bias)
        assert _err(out, ref) < 1e-5, length
        state = ops_cuda._sites[(11, k.device)]
        site, plan = state.buffers, state.plan
        assert site.mode.tolist() == [1, 1]
        assert site.vend.tolist() == ([96, 96] if length == 40 else [length, length])
        # the tail dealt [0, vend) over all its programs (the capacity's split left it to the first two)
        last = ops_cuda._scratch[(k.device, plan)].last_tail.view(plan.bh, plan.nsplit)
        if length > 40:
            assert (last > 0).all(), last


def _site_step(policy, q, k_cache, v_cache, length, site):
    """One decode step of ``site`` on a static cache holding ``length`` tokens; its error vs the reference."""
    cfg = EntmaxKVConfig(policy=policy, page_size=8, budget_pages=2, min_candidates=16)
    scale = q.shape[-1] ** -0.5 * 2
    bias = _mask(1, k_cache.shape[2], [length])
    out = ops_cuda.decode_site(q, k_cache, v_cache, bias, scale, 1.5, site, cfg, n_programs=4, block_n=16)
    ref, _ = decode_attention(q, k_cache, v_cache, scale=scale, alpha=1.5, bias=bias, config=cfg)
    return _err(out, ref)


@pytest.mark.parametrize("policy", ["certified", "topk", "adaptive"])
def test_incremental_metadata_across_steps(policy):
    """A static cache decoded step by step: metadata updated in place equals a fresh rebuild, a shorter
    sequence triggers a rebuild on device, a new cache tensor or ``reset_all`` one on the host."""
    q, k, v = _inputs(1, 2, 2, 1, 96, 64, torch.float32, seed=5)
    k_cache, v_cache = torch.zeros_like(k), torch.zeros_like(v)

    def step(length, site=7):
        assert _site_step(policy, q, k_cache, v_cache, length, site) < 1e-5, length
        return ops_cuda._sites[(site, k_cache.device)].buffers

    k_cache[:, :, :40], v_cache[:, :, :40] = k[:, :, :40], v[:, :, :40]  # prefill
    for length in range(40, 44):
        k_cache[:, :, length - 1], v_cache[:, :, length - 1] = k[:, :, length - 1], v[:, :, length - 1]
        buf = step(length)
    fresh = step(43, site=8)
    for name in ("codes", "scales", "res") if policy == "certified" else ("kmin", "kmax"):
        assert torch.equal(getattr(buf, name), getattr(fresh, name)), name
    assert buf.wm.tolist() == [43, 43]
    # the step recorded the key rows at PROBES positions spread over [0, wm) for the next step's check
    pos = buf.probe_pos.view(2, launch.PROBES).long()
    assert pos.tolist() == [[42 * j // (launch.PROBES - 1) for j in range(launch.PROBES)]] * 2
    rows = buf.probe_rows.view(2, launch.PROBES, 64)
    assert torch.equal(rows, torch.stack([k_cache[0, h, pos[h]] for h in range(2)]))
    k_cache.normal_()  # a new, shorter sequence in the same cache: detected on device
    step(20)
    k_cache[:, :, :30].normal_()
    ops_cuda.reset_all()  # unrelated content at an unsuspicious length: the explicit reset
    step(21)
    assert buf.wm.tolist() == [21, 21]
    k_cache[:, :, :22] = torch.randn(1, 2, 22, 64) * 3  # a new sequence one token longer: like an append
    step(22)  # the probed keys changed: rebuilt, still equal to the reference
    for name in ("codes", "scales", "res") if policy == "certified" else ("kmin", "kmax"):
        assert torch.equal(getattr(buf, name), getattr(step(22, site=9), name)), name


@pytest.mark.parametrize("lq", [1, 3])
def test_rotated_sketch_appends_equal_a_rebuild(lq):
    """Decode steps of ``Lq`` tokens re-sketch their window in one tile of ``p2(2·Lq)`` rows (a rebuild runs
    in tiles of 32) and rotate the query rows on ``p2(R)`` rows: outputs match the reference on every step,
    the window path is the one taken (``vend`` stops at the length) and the sketch equals a fresh rebuild
    (which fails if the window path skips its last position)."""
    q, k, v = _inputs(1, 2, 2, lq, 96, 64, torch.float32, seed=5)
    cfg = EntmaxKVConfig(policy="certified", sketch="int4", sketch_rotation=True, min_candidates=16)
    k_cache, v_cache = torch.zeros_like(k), torch.zeros_like(v)
    scale = 2 / 8

    def step(length, site):
        bias = _mask(1, 96, [length], lq)
        out = ops_cuda.decode_site(q, k_cache, v_cache, bias, scale, 1.5, site, cfg, n_programs=4, block_n=16)
        ref, _ = decode_attention(q, k_cache, v_cache, scale=scale, alpha=1.5, bias=bias, config=cfg)
        assert _err(out, ref) < 1e-5, length
        return ops_cuda._sites[(site, k_cache.device)].buffers

    k_cache[:, :, :40], v_cache[:, :, :40] = k[:, :, :40], v[:, :, :40]  # prefill: a rebuild
    assert step(40, site=21).vend.tolist() == [96, 96]
    for length in range(40 + lq, 53, lq):
        k_cache[:, :, length - lq : length], v_cache[:, :, length - lq : length] = (
            k[:, :, length - lq : length],
            v[:, :, length - lq : length],
        )
        buf = step(length, site=21)
        assert buf.vend.tolist() == [length, length]
    fresh = step(length, site=22)
    for name in ("codes", "scales", "res"):
        assert torch.equal(getattr(buf, name), getattr(fresh, name)), name


@pytest.mark.parametrize("policy", ["certified", "topk"])
def test_new_sequence_after_a_rebuild_with_the_same_first_row(policy):
    """The probes are recorded after the watermark advances: right after a rebuild (first call) they spread
    over the sequence, not all on position 0, so a new sequence sharing only its first key row is seen."""
    q, k, v = _inputs(1, 2, 2, 1, 96, 64, torch.float32, seed=5)
    k_cache, v_cache = k.clone(), v.clone()

    def step(length):
        return _site_step(policy, q, k_cache, v_cache, length, site=11)

    assert step(40) < 1e-5  # first call: a rebuild
    gen = torch.Generator().manual_seed(1)
    k_cache[:, :, 1:41] = torch.randn(1, 2, 40, 64, generator=gen) * 3  # a new sequence, same row 0
    k_cache[:, :, 7] = 4 * q[:, ::2, 0]  # a key the new sequence attends to strongly
    assert step(41) < 1e-5  # looks like an append: only the probes can tell


# packed int8 dot (2R ≤ RP): R = 8 with Lq = 2, MHA (R = 1), padded R = 3, D = 256; R = 16: not packed
@pytest.mark.parametrize("g,lq,d", [(4, 2, 64), (1, 1, 64), (3, 1, 64), (2, 1, 256), (16, 1, 64)])
def test_int8_row_bounds_contain_the_exact_scores_per_row(g, lq, d):
    """The int8 one-step-per-row bound holds for every row of the group, each row's keys worst cases for
    its own query rounding (rows differ in head and position, so a row mix-up of levels or bounds shows)."""
    hkv, s = 1, 64
    gen = torch.Generator().manual_seed(3)
    q = 0.1 * torch.randn(1, hkv * g, lq, d, generator=gen)
    q[..., 5] = 10.0
    q[:, :, -1, 7] = -3.0
    codes = torch.randint(-127, 128, (1, hkv, s, d), generator=gen)
    rows = q[0].reshape(g * lq, d)  # row r: head r // lq, position r % lq
    for j in range(g * lq):
        codes[0, 0, j :: g * lq] = 127 * torch.sign(_two_level_residual(rows[j])).long()
    codes[..., 0] = 127  # every step exactly 1/8: the sketch is exact, the bound carries the query rounding
    k = codes / 8.0
    scale, alpha = 1e-3, 1.5
    cfg = EntmaxKVConfig(policy="certified", sketch="int8", candidate_fraction=1.0, min_candidates=s)
    plan = make_plan(tuple(q.shape), tuple(k.shape), d, cfg, 4, 16)
    assert plan.block_sk == (32 if 2 * plan.r <= plan.rp else 16)
    site, sc = SiteBuffers(plan, q.device, k.dtype), Scratch(plan, q.device)
    st = Step(plan, q, k, k, None, scale, alpha)
    _update(st, site, sc)
    _score(st, sc, 0, sketch=site)
    exact = (alpha - 1) * scale * rows.double() @ k[0, 0].double().T  # [R, S]
    seen = 0
    for seg in range(plan.nsplit):
        pos, z = _kept(sc, plan, seg)
        assert (z[0].double() <= exact[:, pos]).all() and (z[1].double() >= exact[:, pos]).all()
        zmax = sc.seg_max[seg * plan.rp :][: plan.r]
        assert torch.equal(zmax, z[0].max(1).values)  # the running maxima of rows < R, per row
        seen += len(pos)
    assert seen == s
