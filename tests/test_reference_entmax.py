"""The reference α-entmax against the ``entmax`` package (fp64): masks, low precision, large offsets."""

from __future__ import annotations

import math

import entmax as pkg
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entmaxkv_compile.reference import entmax, entmax15, entmax_probs, entmax_threshold, sparsemax

ALPHAS = (1.25, 1.5, 1.75, 2.0)


def package_entmax(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The package's entmax in fp64; masked (−inf) entries become finite values far below the row."""
    x = x.double()
    floor = torch.where(torch.isfinite(x), x, torch.full_like(x, math.inf)).amin(-1, keepdim=True)
    x = torch.where(torch.isfinite(x), x, floor - 1e3)
    if alpha == 2.0:
        return pkg.sparsemax(x, dim=-1)
    if alpha == 1.5:
        return pkg.entmax15(x, dim=-1)
    return pkg.entmax_bisect(x, alpha=alpha, dim=-1, n_iter=100)


def random_scores(seed: int, rows: int, n: int, mask_rate: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * 4
    x[torch.rand(rows, n, generator=g) < mask_rate] = -math.inf
    x[:, 0] = x[:, 0].nan_to_num(neginf=0.0)  # at least one valid entry per row
    return x


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("mask_rate", [0.0, 0.5])
def test_matches_package(alpha: float, mask_rate: float) -> None:
    x = random_scores(0, 16, 257, mask_rate)
    got = entmax(x, alpha)
    ref = package_entmax(x, alpha)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)
    assert torch.all(got[~torch.isfinite(x)] == 0)
    assert (got > 0).sum() < got.numel()  # the test inputs do produce exact zeros


def test_named_forms() -> None:
    x = random_scores(1, 4, 33, 0.2)
    torch.testing.assert_close(sparsemax(x).double(), package_entmax(x, 2.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(entmax15(x).double(), package_entmax(x, 1.5), atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("offset", [1e2, 1e4])
def test_large_offsets(alpha: float, offset: float) -> None:
    # entmax is shift invariant; the solver must not lose the spread of large scores to cancellation
    x = random_scores(2, 8, 1000, 0.0) + offset
    torch.testing.assert_close(entmax(x, alpha).double(), package_entmax(x, alpha), atol=1e-5, rtol=0)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(alpha: float, dtype: torch.dtype) -> None:
    x = random_scores(3, 8, 129, 0.3).to(dtype)
    got = entmax(x, alpha)
    assert got.dtype == dtype
    ref = package_entmax(x, alpha)  # the same (rounded) inputs, solved in fp64
    tol = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_fully_masked_rows(alpha: float) -> None:
    x = random_scores(4, 3, 10, 0.0)
    x[1] = -math.inf
    p = entmax(x, alpha)
    assert not p.isnan().any()
    assert torch.all(p[1] == 0)
    torch.testing.assert_close(p.sum(-1), torch.tensor([1.0, 0.0, 1.0]), atol=1e-5, rtol=0)
    assert entmax_threshold((alpha - 1) * x, alpha)[1].item() == 0.0


def test_dim_argument() -> None:
    x = random_scores(5, 6, 7, 0.2)
    torch.testing.assert_close(entmax(x.T, 1.5, dim=0), entmax(x, 1.5).T)


def test_rejects_bad_alpha() -> None:
    with pytest.raises(ValueError, match="alpha"):
        entmax(torch.zeros(3), 1.0)


@settings(max_examples=60, deadline=None)
@given(
    x=hnp.arrays(np.float64, st.integers(1, 40), elements=st.floats(-30, 30)),
    alpha=st.sampled_from(ALPHAS),
)
def test_threshold_solves_the_mass_equation(x: np.ndarray, alpha: float) -> None:
    z = torch.from_numpy(x).float()[None] * (alpha - 1)
    tau = entmax_threshold(z, alpha)
    zmax = z.max().item()
    assert zmax - 1 - 1e-5 <= tau.item() < zmax
    assert abs(entmax_probs(z, tau, alpha).sum().item() - 1) < 1e-4
    ref = package_entmax(torch.from_numpy(x)[None].float(), alpha)
    torch.testing.assert_close(
        entmax(torch.from_numpy(x).float()[None], alpha).double(), ref, atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_finfo_min_fills_never_enter_the_support(alpha: float) -> None:
    """Two finfo.min fills overflow the sorted prefix sums to −inf (found by tests/test_fuzz_zoo.py)."""
    low = torch.finfo(torch.float32).min
    x = torch.tensor([[-1.8636, low, low, 1.5895, 0.2708]])
    expected = entmax(torch.tensor([[-1.8636, -math.inf, -math.inf, 1.5895, 0.2708]]), alpha)
    torch.testing.assert_close(entmax(x, alpha), expected)
