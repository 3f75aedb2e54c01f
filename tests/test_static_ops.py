"""Static-budget ops: the exportable decompositions against the reference semantics (their eager kernels)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entmaxkv_compile.ops.static import (
    _shifted_threshold,
    _threshold_sort_free,
    check_static_certified,
    check_static_topk,
    static_certified_decomposition,
    static_topk_decomposition,
)
from entmaxkv_compile.reference.decode import dense_decode

B, HQ, HKV, S, D, SCALE = 2, 4, 2, 256, 32, 0.3


def _inputs(dtype: torch.dtype, lq: int = 1, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """GQA 4/2 with a per-head mask: different lengths per row, a hole, one head hiding the first pages."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, lq, D, generator=g).to(dtype)
    k = torch.randn(B, HKV, S, D, generator=g).to(dtype)
    v = torch.randn(B, HKV, S, D, generator=g).to(dtype)
    bias = torch.zeros(B, HQ, lq, S)
    bias[0, ..., 200:] = -math.inf
    bias[1, ..., 90:120] = -math.inf
    bias[1, 3, :, :64] = -math.inf
    bias[..., 7] = -2.0  # a finite bias too
    return q, k, v, bias


def _same_ids(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.sort(-1).values, b.sort(-1).values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("budget", [2, 6])
@pytest.mark.parametrize("lq", [1, 2])
def test_topk_decomposition_matches_reference(dtype: torch.dtype, alpha: float, budget: int, lq: int) -> None:
    q, k, v, bias = _inputs(dtype, lq)
    args = (q, k, v, bias, SCALE, alpha, budget, 16, 1, 2)
    out_ref, pages_ref = torch.ops.entmaxkv.static_topk_attn(*args)
    out, pages = static_topk_decomposition(*args)
    assert pages.shape == (B, HKV, budget + 3)
    assert _same_ids(pages, pages_ref)
    torch.testing.assert_close(out, out_ref, atol=1e-5 if dtype == torch.float32 else 2e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("capacity", [24, 96])
@pytest.mark.parametrize("sketch", [(8, 32, False), (4, 32, True)])  # (bits, group, rotated)
def test_certified_decomposition_matches_reference(
    dtype: torch.dtype, alpha: float, capacity: int, sketch: tuple[int, int, bool]
) -> None:
    q, k, v, bias = _inputs(dtype)
    args = (q, k, v, bias, SCALE, alpha, capacity, *sketch)
    out_ref, tokens_ref, cert_ref = torch.ops.entmaxkv.static_certified_attn(*args)
    out, tokens, cert = static_certified_decomposition(*args)
    assert _same_ids(tokens, tokens_ref)
    assert torch.equal(cert, cert_ref)
    torch.testing.assert_close(out, out_ref, atol=1e-5 if dtype == torch.float32 else 2e-3, rtol=0)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
@pytest.mark.parametrize("rotate", [False, True])
def test_certified_rows_equal_dense(alpha: float, rotate: bool) -> None:
    """The flag is a proof: every certified row equals dense entmax attention; both outcomes occur here."""
    q, k, v, bias = _inputs(torch.float32, seed=1)
    out, _, cert = static_certified_decomposition(q, k, v, bias, SCALE, alpha, 64, 8, 32, rotate)
    dense = dense_decode(q, k, v, scale=SCALE, alpha=alpha, bias=bias)
    err = (out - dense).abs().amax(-1)
    assert cert.any()
    assert err[cert].max() < 1e-5
    # with a tiny capacity, sharp scores (large scale) certify more rows than flat ones
    wide = static_certified_decomposition(q, k, v, bias, 3.0, alpha, 8, 8, 32, False)[2]
    narrow = static_certified_decomposition(q, k, v, bias, 0.05, alpha, 8, 8, 32, False)[2]
    assert wide.sum() > narrow.sum() and not narrow.all()


def test_topk_decomposition_nan_query_row_takes_no_part_in_the_ranking() -> None:
    """As the reference: a row whose query is not finite is NaN and its group's pages are the other rows'."""
    q, k, v, bias = _inputs(torch.float32)
    q[0, 1, 0, 5] = math.nan
    args = (q, k, v, bias, SCALE, 1.5, 2, 16, 1, 2)
    out_ref, pages_ref = torch.ops.entmaxkv.static_topk_attn(*args)
    out, pages = static_topk_decomposition(*args)
    assert _same_ids(pages, pages_ref)
    assert out[0, 1].isnan().all() and out_ref[0, 1].isnan().all()
    out[0, 1] = out_ref[0, 1] = 0
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=0)


def test_unused_slots_are_minus_one() -> None:
    """A row with fewer live pages than slots pads with −1 and attends only what it sees."""
    q, k, v, bias = _inputs(torch.float32)
    bias[0, ..., 40:] = -math.inf  # row 0 sees 3 pages
    out, pages = static_topk_decomposition(q, k, v, bias, SCALE, 1.5, 6, 16, 1, 2)
    assert (pages[0] >= 0).sum(-1).tolist() == [3, 3]
    torch.testing.assert_close(out[0], dense_decode(q, k, v, scale=SCALE, alpha=1.5, bias=bias)[0])


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    spread=st.sampled_from([1e-3, 0.1, 1.0, 30.0]),
    masked=st.floats(0.0, 0.9),
    ties=st.booleans(),
    alpha=st.sampled_from([1.5, 2.0]),
    seed=st.integers(0, 2**16),
)
def test_sort_free_threshold_equals_sorted(
    n: int, spread: float, masked: float, ties: bool, alpha: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(3, n, generator=g) * spread
    if ties:
        z = (z * 4).round() / 4
    z[torch.rand(3, n, generator=g) < masked] = -math.inf
    z[:, 0] = z[:, 0].nan_to_num(neginf=0.0)  # at least one visible score per row
    tau, zmax = _threshold_sort_free(z, alpha)
    tau_ref, zmax_ref = _shifted_threshold(z, alpha)
    assert torch.equal(zmax, zmax_ref)
    torch.testing.assert_close(tau, tau_ref, atol=1e-6, rtol=0)


def test_budget_checks() -> None:
    check_static_topk(256, 16, 12, 1, 2)
    with pytest.raises(ValueError, match="must be smaller than the cache's 16 pages"):
        check_static_topk(256, 16, 13, 1, 2)
    with pytest.raises(ValueError, match="multiple of page_size=16"):
        check_static_topk(250, 16, 2, 1, 2)
    with pytest.raises(ValueError, match="capacity 256 must be in"):
        check_static_certified(256, 256)
    q, k, v, bias = _inputs(torch.float32)
    with pytest.raises(NotImplementedError, match="alpha in"):
        torch.ops.entmaxkv.static_topk_attn(q, k, v, bias, SCALE, 1.3, 2, 16, 1, 2)
