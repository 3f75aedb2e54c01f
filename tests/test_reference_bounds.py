"""Page boxes, page/group upper bounds, key sketches and the threshold monotonicity they rest on."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entmaxkv_compile.reference import (
    attention_scores,
    build_sketch,
    entmax_threshold,
    group_bound,
    page_counts,
    page_metadata,
    page_upper_bound,
    sketch_score_bounds,
)
from entmaxkv_compile.reference.sketch import rotation, rotation_eps

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def alibi(hq: int, lq: int, s: int) -> torch.Tensor:
    """ALiBi bias ``[1, Hq, Lq, S]``: −slope_h · distance from the query position (queries at the end)."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, hq + 1) / hq)
    pos_q = torch.arange(s - lq, s)[:, None]
    return -(slopes[:, None, None] * (pos_q - torch.arange(s)).abs())[None]


def qkv(seed: int, b: int, hq: int, hkv: int, lq: int, s: int, d: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g).to(dtype)
    k = (torch.randn(b, hkv, s, d, generator=g) * torch.rand(1, 1, 1, d, generator=g) * 3).to(dtype)
    return q, k, g


def per_page_max(x: torch.Tensor, page_size: int) -> torch.Tensor:
    """Brute-force max over each page of the last dim (−inf for padding)."""
    pages = [x[..., i : i + page_size].amax(-1) for i in range(0, x.shape[-1], page_size)]
    return torch.stack(pages, -1)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    groups=st.sampled_from([(1, 1), (2, 1), (4, 2), (8, 2)]),
    lq=st.integers(1, 3),
    s=st.integers(1, 70),
    page_size=st.sampled_from([4, 8, 16]),
    dtype=st.sampled_from(DTYPES),
    use_alibi=st.booleans(),
    mask_rate=st.sampled_from([0.0, 0.3, 0.9]),
)
def test_page_bound_dominates_every_score(
    seed: int,
    groups: tuple[int, int],
    lq: int,
    s: int,
    page_size: int,
    dtype: torch.dtype,
    use_alibi: bool,
    mask_rate: float,
) -> None:
    hq, hkv = groups
    q, k, g = qkv(seed, 2, hq, hkv, lq, s, 32, dtype)
    valid = torch.rand(2, s, generator=g) >= mask_rate
    bias = torch.zeros(2, 1, 1, s).masked_fill(~valid[:, None, None], -math.inf)
    if use_alibi:
        bias = bias + alibi(hq, lq, s)
    scale = 32**-0.5
    kmin, kmax = page_metadata(k, page_size, valid)
    u = page_upper_bound(q, kmin, kmax, scale, bias, page_size)
    scores = attention_scores(q, k, scale=scale, bias=bias)
    pad = -s % page_size
    best = per_page_max(torch.nn.functional.pad(scores, (0, pad), value=-math.inf), page_size)
    assert u.shape == best.shape == (2, hq, lq, -(-s // page_size))
    assert torch.all(u >= best)
    # −inf exactly where a page holds no attendable token, finite (and not vacuous) elsewhere
    assert torch.equal(u == -math.inf, best == -math.inf)
    gb = group_bound(u, hkv)
    assert torch.equal(gb, u.reshape(2, hkv, -1, u.shape[-1]).amax(2))


def test_page_bound_is_tight_for_single_token_pages() -> None:
    q, k, _ = qkv(0, 1, 4, 2, 1, 12, 64)
    valid = torch.zeros(1, 12, dtype=torch.bool)
    valid[0, ::4] = True  # one token per page of 4
    kmin, kmax = page_metadata(k, 4, valid)
    u = page_upper_bound(q, kmin, kmax, 0.125, None, 4)
    scores = attention_scores(q, k, scale=0.125)[..., ::4]
    assert torch.all(u >= scores)
    torch.testing.assert_close(u, scores, atol=5e-4, rtol=0)  # only the fp32 rounding slack apart


def test_page_metadata_ignores_masked_slots_and_padding() -> None:
    _, k, _ = qkv(1, 2, 2, 2, 1, 10, 8)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, 3] = valid[1, 8:] = False
    k[0, :, 3] = 1e4  # garbage in a masked slot must not widen the box
    kmin, kmax = page_metadata(k, 4, valid)
    assert kmin.shape == (2, 2, 3, 8) and kmin.dtype == k.dtype
    for b in range(2):
        for p in range(3):
            sel = torch.arange(4 * p, min(4 * p + 4, 10))
            sel = sel[valid[b, sel]]
            if len(sel) == 0:
                assert torch.all(kmin[b, :, p] == math.inf) and torch.all(kmax[b, :, p] == -math.inf)
            else:
                assert torch.equal(kmin[b, :, p], k[b, :, sel].amin(1))
                assert torch.equal(kmax[b, :, p], k[b, :, sel].amax(1))
    assert torch.equal(page_counts(valid, 4), torch.tensor([[3, 4, 2], [4, 4, 0]]))
    u = page_upper_bound(torch.randn(2, 4, 1, 8), kmin, kmax, 1.0, None, 4)
    assert torch.all(u[1, ..., 2] == -math.inf) and torch.isfinite(u[0]).all()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.sampled_from([8, 4]),
    group=st.sampled_from([8, 16, 32, 64]),
    dtype=st.sampled_from(DTYPES),
    key_scale=st.sampled_from([1e-30, 1e-3, 1.0, 50.0]),
    outliers=st.booleans(),
    rotate=st.booleans(),
)
def test_sketch_bound_holds(
    seed: int, bits: int, group: int, dtype: torch.dtype, key_scale: float, outliers: bool, rotate: bool
) -> None:
    """The bound holds for plain sketches and for sketches of R·k scored with R·q (R orthogonal, its fp32
    error in ε)."""
    q, k, g = qkv(seed, 2, 4, 2, 2, 40, 64, dtype)
    k = k * key_scale
    if outliers:
        k[..., 5] *= 30
    sketch = build_sketch(k, bits, group, rotate=rotate)
    s_hat, eps = sketch_score_bounds(q, sketch, 0.125)
    s = attention_scores(q, k, scale=0.125)
    assert torch.all((s - s_hat).abs() <= eps)
    if rotate:
        return
    # the stored pieces are what they claim to be
    qmax = 127 if bits == 8 else 7
    assert sketch.codes.dtype == torch.int8 and sketch.codes.abs().max() <= qmax
    step = sketch.scales.repeat_interleave(group, -1)
    assert torch.equal(sketch.k_hat, sketch.codes.float() * step)
    kf = k.float()
    torch.testing.assert_close(sketch.residual, (kf - sketch.k_hat).norm(dim=-1))
    # rounding to the nearest code: per-element error at most half a step (+ the ulp of ``code·step``)
    assert torch.all((kf - sketch.k_hat).abs() <= step / 2 + 2.0**-22 * kf.abs())


@pytest.mark.parametrize("d", [64, 128, 256])
def test_rotation_is_orthogonal_and_its_fp32_error_is_bounded(d: int) -> None:
    r = rotation(d).double()
    torch.testing.assert_close(r @ r.T, torch.eye(d, dtype=torch.float64), atol=1e-6, rtol=0)
    x = torch.randn(512, d, generator=torch.Generator().manual_seed(d)) * torch.logspace(-3, 3, d)
    exact = x.double() @ (torch.tensor(d, dtype=torch.float64) ** -0.5 * (r * d**0.5).round()).T
    err = (x @ rotation(d).T).double() - exact
    assert torch.all(err.norm(dim=-1) <= rotation_eps(d) * x.double().norm(dim=-1))


def test_rotation_spreads_outlier_channels() -> None:
    """Keys with a few large channels: one int4 step per row of R·k is tighter than per 32 channels of k."""
    q, k, _ = qkv(9, 1, 2, 1, 1, 200, 64)
    k[..., :3] *= 8
    plain = sketch_score_bounds(q, build_sketch(k, 4, 32), 0.125)[1]
    rotated = sketch_score_bounds(q, build_sketch(k, 4, 64, rotate=True), 0.125)[1]
    assert rotated.mean() < 0.8 * plain.mean()


def test_sketch_bound_with_exact_keys() -> None:
    # keys the sketch stores exactly (r = 0): ε must still cover fp32 rounding of the two dot products
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-127, 128, (1, 1, 64, 128), generator=g).float()
    codes[..., ::32] = 127  # every group reaches the full code range, so its step is exactly 1/128
    k = codes / 128
    q = torch.randn(1, 2, 1, 128, generator=g) * 100
    sketch = build_sketch(k, 8, 32)
    assert torch.all(sketch.residual == 0)
    s_hat, eps = sketch_score_bounds(q, sketch, 1.0)
    assert torch.all(eps > 0)
    assert torch.all((attention_scores(q, k, scale=1.0) - s_hat).abs() <= eps)


def test_int8_sketch_is_tighter_than_int4() -> None:
    q, k, _ = qkv(4, 1, 2, 1, 1, 200, 64)
    e8 = sketch_score_bounds(q, build_sketch(k, 8, 32), 0.125)[1]
    e4 = sketch_score_bounds(q, build_sketch(k, 4, 32), 0.125)[1]
    assert e8.mean() * 8 < e4.mean()  # 16× finer steps
    s = attention_scores(q, k, scale=0.125)
    assert e8.mean() < 0.1 * s.std()


def test_sketch_rejects_bad_settings() -> None:
    k = torch.randn(1, 1, 4, 64)
    with pytest.raises(ValueError, match="bits"):
        build_sketch(k, 2, 32)
    with pytest.raises(ValueError, match="divide"):
        build_sketch(k, 8, 48)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 200),
    alpha=st.sampled_from([1.25, 1.5, 1.75, 2.0]),
    spread=st.sampled_from([0.1, 1.0, 10.0]),
)
def test_subset_threshold_is_below_full_threshold(seed: int, n: int, alpha: float, spread: float) -> None:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(8, n, generator=g) * spread
    keep = torch.rand(8, n, generator=g) < torch.rand(8, 1, generator=g)
    keep[:, 0] = True
    tau_full = entmax_threshold(z, alpha)
    tau_sub = entmax_threshold(z.masked_fill(~keep, -math.inf), alpha)
    assert torch.all(tau_sub <= tau_full + 1e-6 * (1 + tau_full.abs()))
    # and the bound is attained when the subset holds the whole support
    support = z > tau_full
    with_support = entmax_threshold(z.masked_fill(~(keep | support), -math.inf), alpha)
    torch.testing.assert_close(with_support, tau_full, atol=1e-5, rtol=1e-6)
