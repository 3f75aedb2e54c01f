"""Decode policies of the oracle: dense semantics, exact ``certified``, soundness of the certificate."""

from __future__ import annotations

import math

import entmax as pkg
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.reference import decode_attention, dense_decode

ALPHAS = (1.25, 1.5, 1.75, 2.0)
ATOL = 2e-5  # "equal up to rounding" for fp32 outputs of unit-scale values


def make_inputs(
    seed: int,
    *,
    b: int = 2,
    hq: int = 4,
    hkv: int = 2,
    lq: int = 1,
    s: int = 96,
    d: int = 32,
    aligned: int = 0,
    mask_rate: float = 0.0,
    use_alibi: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q/k/v and an additive bias; ``aligned`` tokens per KV group get keys along the group's queries
    (a small, peaked support, like trained attention); the last slots of batch row 1 are unwritten."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    if aligned:
        pos = torch.randperm(s, generator=g)[:aligned]
        direction = q.reshape(b, hkv, -1, d).mean(2)
        k[:, :, pos] = 4 * direction[:, :, None] / direction.norm(dim=-1)[..., None, None] * d**0.5
    valid = torch.rand(b, s, generator=g) >= mask_rate
    valid[:, 0] = True
    valid[-1, s - s // 4 :] = False
    bias = torch.zeros(b, 1, lq, s).masked_fill(~valid[:, None, None], -math.inf)
    for row in range(lq - 1):  # speculative decode: query row r does not see the drafted tokens after it
        bias[..., row, s - (lq - 1 - row) :] = -math.inf
    if use_alibi:
        slopes = 2.0 ** (-8.0 * torch.arange(1, hq + 1) / hq)
        dist = (torch.arange(s - lq, s)[:, None] - torch.arange(s)).abs()
        bias = bias - slopes[:, None, None] * dist
    return q.to(dtype), k.to(dtype), v.to(dtype), bias


def package_probs(q, k, bias, scale: float, alpha: float) -> torch.Tensor:
    """Dense entmax probabilities from the ``entmax`` package in fp64 with explicit ``repeat_kv``."""
    kk = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = scale * q.double() @ kk.transpose(-1, -2) + bias.double()
    s = torch.where(torch.isfinite(s), s, torch.full_like(s, -1e6))
    if alpha == 2.0:
        return pkg.sparsemax(s, dim=-1)
    if alpha == 1.5:
        return pkg.entmax15(s, dim=-1)
    return pkg.entmax_bisect(s, alpha=alpha, dim=-1, n_iter=100)


def package_dense(q, k, v, bias, scale: float, alpha: float) -> torch.Tensor:
    vv = v.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return package_probs(q, k, bias, scale, alpha) @ vv


def valid_tokens(bias: torch.Tensor) -> torch.Tensor:
    """Tokens per batch row that some head or query row may attend, ``[B, 1]``."""
    return torch.isfinite(bias).flatten(1, 2).any(1).sum(-1)[:, None]


def run(policy: str, q, k, v, bias, alpha: float, **cfg) -> tuple[torch.Tensor, object, torch.Tensor]:
    scale = q.shape[-1] ** -0.5
    ref = dense_decode(q, k, v, scale=scale, alpha=alpha, bias=bias)
    config = EntmaxKVConfig(policy=policy, **cfg)
    out, stats = decode_attention(q, k, v, scale=scale, alpha=alpha, bias=bias, config=config, dense_out=ref)
    return out, stats, ref


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("lq", [1, 3])
def test_dense_decode_matches_package(alpha: float, lq: int) -> None:
    q, k, v, bias = make_inputs(0, lq=lq, hq=6, hkv=2, mask_rate=0.3, use_alibi=True, aligned=3)
    scale = q.shape[-1] ** -0.5
    out = dense_decode(q, k, v, scale=scale, alpha=alpha, bias=bias)
    assert out.shape == (2, 6, lq, 32) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), package_dense(q, k, v, bias, scale, alpha), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dense_decode_low_precision(dtype: torch.dtype) -> None:
    q, k, v, bias = make_inputs(1, aligned=2, dtype=dtype)
    out = dense_decode(q, k, v, scale=0.2, alpha=1.5, bias=bias)
    assert out.dtype == dtype
    ref = package_dense(q, k, v, bias, 0.2, 1.5)
    tol = 2 * torch.finfo(dtype).eps
    torch.testing.assert_close(out.double(), ref, atol=tol * ref.abs().max().item(), rtol=0)
    config = EntmaxKVConfig(policy="certified", min_candidates=16)
    sparse, stats = decode_attention(q, k, v, scale=0.2, alpha=1.5, bias=bias, config=config, dense_out=out)
    assert sparse.dtype == dtype and stats.certified.all() and torch.all(stats.output_error <= tol)


@pytest.mark.parametrize("policy", ["dense", "topk", "adaptive", "certified"])
def test_fully_masked_rows_give_zero(policy: str) -> None:
    q, k, v, bias = make_inputs(2, lq=2)
    bias = bias.expand(2, 4, 2, 96).clone()
    bias[0, 1, 1] = -math.inf  # one query row sees nothing
    out, stats, ref = run(policy, q, k, v, bias, 1.5, min_candidates=8)
    assert not out.isnan().any() and torch.all(out[0, 1, 1] == 0) and torch.all(ref[0, 1, 1] == 0)
    assert stats.support_size[0, 1, 1] == 0 and stats.delta_bound[0, 1, 1] == 0


def test_dense_policy_stats() -> None:
    q, k, v, bias = make_inputs(3, aligned=2, mask_rate=0.2)
    out, stats, ref = run("dense", q, k, v, bias, 1.5, page_size=8)
    assert torch.equal(out, ref)
    valid = torch.isfinite(bias[:, 0, 0])
    assert torch.equal(stats.tokens_read, valid.sum(-1)[:, None].expand(2, 2))
    assert stats.certified.all() and not stats.fallback.any() and torch.all(stats.delta_bound == 0)
    assert torch.all(stats.dropped_mass == 0) and torch.all(stats.support_recall == 1)
    assert torch.all(stats.output_error == 0)
    # byte model: every valid K row, V rows of the group's support, no metadata (fp32: 4 bytes)
    p = package_probs(q, k, bias, 32**-0.5, 1.5)
    support_union = (p > 0).reshape(2, 2, -1, 96).any(2).sum(-1)
    expected = (valid.sum(-1)[:, None] * 32 + support_union * 32) / (valid.sum(-1)[:, None] * 64)
    torch.testing.assert_close(stats.kv_bytes_fraction, expected.float())
    assert torch.equal(stats.support_size, (p > 0).sum(-1))


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("sketch", ["int8", "int4"])
@pytest.mark.parametrize("aligned", [0, 4])
def test_certified_equals_dense(alpha: float, sketch: str, aligned: int) -> None:
    q, k, v, bias = make_inputs(4, lq=2, s=400, aligned=aligned, mask_rate=0.1, use_alibi=True)
    out, stats, ref = run(
        "certified", q, k, v, bias, alpha, sketch=sketch, min_candidates=16, candidate_fraction=1.0
    )
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert stats.certified.all() and torch.all(stats.delta_bound == 0) and not stats.fallback.any()
    assert torch.all(stats.support_recall == 1) and torch.all(stats.dropped_mass == 0)
    if aligned and sketch == "int8":  # a peaked support is found reading a small share of K
        assert stats.tokens_read.max() <= 0.25 * 400
        assert stats.kv_bytes_fraction.max() < 0.6


def test_certified_over_capacity_falls_back_to_dense() -> None:
    q, k, v, bias = make_inputs(5, s=300)
    out, stats, ref = run(
        "certified", q, k, v, bias, 1.25, sketch="int4", min_candidates=1, candidate_fraction=0.01
    )
    assert stats.fallback.all() and stats.certified.all()
    assert torch.all(stats.candidates > 3)  # capacity = ceil(0.01 · 300)
    assert torch.equal(stats.tokens_read, valid_tokens(bias).expand(2, 2))
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    alpha=st.sampled_from(ALPHAS),
    groups=st.sampled_from([(2, 2), (4, 1), (4, 2)]),
    lq=st.integers(1, 2),
    s=st.integers(8, 200),
    aligned=st.integers(0, 5),
    sketch=st.sampled_from(["int8", "int4"]),
    use_alibi=st.booleans(),
)
def test_certified_is_exact(
    seed: int,
    alpha: float,
    groups: tuple[int, int],
    lq: int,
    s: int,
    aligned: int,
    sketch: str,
    use_alibi: bool,
) -> None:
    hq, hkv = groups
    q, k, v, bias = make_inputs(seed, hq=hq, hkv=hkv, lq=lq, s=s, aligned=aligned, use_alibi=use_alibi)
    out, stats, ref = run(
        "certified", q, k, v, bias, alpha, sketch=sketch, min_candidates=8, candidate_fraction=0.3
    )
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert stats.certified.all()
    assert torch.all(stats.support_recall == 1)


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    alpha=st.sampled_from(ALPHAS),
    policy=st.sampled_from(["topk", "adaptive"]),
    lq=st.integers(1, 2),
    s=st.integers(8, 160),
    page_size=st.sampled_from([4, 8, 16]),
    budget=st.integers(1, 6),
    sink=st.integers(0, 1),
    recent=st.integers(0, 2),
    aligned=st.integers(0, 4),
    use_alibi=st.booleans(),
    slack=st.sampled_from([0.0, 0.5]),
)
def test_certificate_and_delta_are_sound(
    seed: int,
    alpha: float,
    policy: str,
    lq: int,
    s: int,
    page_size: int,
    budget: int,
    sink: int,
    recent: int,
    aligned: int,
    use_alibi: bool,
    slack: float,
) -> None:
    q, k, v, bias = make_inputs(seed, lq=lq, s=s, aligned=aligned, mask_rate=0.2, use_alibi=use_alibi)
    cfg = dict(
        page_size=page_size, budget_pages=budget, sink_pages=sink, recent_pages=recent, adaptive_slack=slack
    )
    out, stats, ref = run(policy, q, k, v, bias, alpha, **cfg)
    # δ bounds the dense probability mass left out (and never exceeds 1)
    assert torch.all(stats.delta_bound + 1e-6 >= stats.dropped_mass)
    assert torch.all(stats.delta_bound <= 1)
    # a certified KV group decodes exactly like dense
    err = (out - ref).abs().amax(-1).reshape(2, 2, -1).amax(-1)  # [B, Hkv]
    assert torch.all(err[stats.certified] <= ATOL)
    assert torch.equal(stats.certified, (stats.delta_bound == 0).reshape(2, 2, -1).all(-1))
    n_pages = -(-s // page_size)
    assert torch.all(stats.pages_selected <= min(n_pages, budget + sink + recent))


def test_certificate_can_fail() -> None:
    # random keys, a budget of one page: the certificate must refuse, and δ must see the dropped mass
    q, k, v, bias = make_inputs(6, s=256)
    out, stats, ref = run(
        "topk", q, k, v, bias, 1.5, page_size=16, budget_pages=1, sink_pages=0, recent_pages=0
    )
    assert not stats.certified.any()
    assert torch.all(stats.dropped_mass > 0) and torch.all(stats.delta_bound >= stats.dropped_mass)
    assert (out - ref).abs().max() > 1e-2
    assert torch.all(stats.output_error > 0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_delta_bound_counts_every_token_of_a_page(alpha: float) -> None:
    # point boxes: page 0 holds 8 copies of a key scoring 2.0, page 1 eight copies scoring 1.9 (dropped)
    q = torch.zeros(1, 1, 1, 16)
    q[..., 0] = 1
    k = torch.zeros(1, 1, 32, 16)
    k[..., :8, 0], k[..., 8:16, 0], k[..., 16:, 0] = 2.0, 1.9, -1.0
    v = torch.randn(1, 1, 32, 16)
    ref = dense_decode(q, k, v, scale=1.0, alpha=alpha)
    config = EntmaxKVConfig(policy="topk", page_size=8, budget_pages=1, sink_pages=0, recent_pages=0)
    _, stats = decode_attention(q, k, v, scale=1.0, alpha=alpha, config=config, dense_out=ref)
    assert stats.support_recall.item() == 0.5 and not stats.certified.any()
    assert stats.delta_bound.item() >= stats.dropped_mass.item() > 0.05
    if alpha == 2.0:  # by hand: τ_S = 2 − 1/8, δ = 8·(1.9 − τ_S) = 0.2; τ_full = 1.8875, dropped = 0.1
        assert stats.delta_bound.item() == pytest.approx(0.2, abs=1e-3)
        assert stats.dropped_mass.item() == pytest.approx(0.1, abs=1e-5)


@pytest.mark.parametrize("policy", ["topk", "adaptive"])
@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_budget_covering_everything_is_dense(policy: str, alpha: float) -> None:
    q, k, v, bias = make_inputs(7, lq=2, s=100, mask_rate=0.3, use_alibi=True)
    out, stats, ref = run(policy, q, k, v, bias, alpha, page_size=8, budget_pages=13, adaptive_slack=1e9)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert stats.certified.all() and torch.all(stats.delta_bound == 0)
    assert torch.equal(stats.tokens_read, valid_tokens(bias).expand(2, 2))


def test_sink_and_recent_pages() -> None:
    q, k, v, bias = make_inputs(8, s=70)  # row 1: slots 53.. unwritten
    _, stats, _ = run("topk", q, k, v, bias, 1.5, page_size=8, budget_pages=1, sink_pages=1, recent_pages=2)
    pages = (
        stats.selected.reshape(2, 2, -1)[..., :64].unflatten(-1, (8, 8)).any(-1)
    )  # 9th page: tokens 64..69
    last = stats.selected[..., 64:].any(-1)
    assert pages[:, :, 0].all()  # sink
    assert last[0].all() and pages[0, :, 7].all()  # row 0: the last two pages (8 and 7)
    assert not last[1].any() and pages[1, :, 6].all() and pages[1, :, 5].all()  # row 1: last written pages
    assert torch.all(stats.pages_selected <= 4)


def test_topk_ties_go_to_the_lowest_pages() -> None:
    """Every page of a group holds the same keys, so every page bound ties: the budget takes the lowest
    pages, as the kernels' radix select does (torch.topk alone picks an unspecified subset of equal
    values)."""
    q, k, v, _ = make_inputs(8, s=128)
    k[:] = k[:, :, :1]
    _, stats, _ = run("topk", q, k, v, None, 1.5, page_size=8, budget_pages=5, sink_pages=0, recent_pages=0)
    pages = stats.selected.unflatten(-1, (16, 8)).any(-1)  # [B, Hkv, 16 pages]
    assert pages[..., :5].all() and not pages[..., 5:].any()


def test_adaptive_keeps_pages_that_can_cross_the_estimate() -> None:
    # keys of a page share a direction, so boxes are tight: the adaptive estimate keeps only a few pages
    g = torch.Generator().manual_seed(9)
    centres = torch.randn(1, 1, 16, 1, 32, generator=g)
    k = (centres + 0.05 * torch.randn(1, 1, 16, 8, 32, generator=g)).flatten(2, 3)
    q, v = 3 * centres[:, :, 3], torch.randn(1, 1, 128, 32, generator=g)
    bias = torch.zeros(1, 1, 1, 128)
    out, stats, ref = run(
        "adaptive", q, k, v, bias, 1.5, page_size=8, budget_pages=16, sink_pages=0, recent_pages=0
    )
    assert stats.pages_selected.item() < 16 and stats.certified.all()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_min_context_falls_back() -> None:
    q, k, v, bias = make_inputs(10, s=64)
    out, stats, ref = run("topk", q, k, v, bias, 1.5, budget_pages=1, min_context=1000)
    assert stats.fallback.all() and stats.certified.all()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_sketch_rotation_and_group_defaults() -> None:
    """int4 sketches are rotated with one step per row by default; unrotated int4 keeps groups of 32."""
    int4, int8 = EntmaxKVConfig(sketch="int4"), EntmaxKVConfig()
    assert int4.rotate_sketch and int4.group_size(128) == 128
    assert not int8.rotate_sketch and int8.group_size(128) == 128
    plain = EntmaxKVConfig(sketch="int4", sketch_rotation=False)
    assert not plain.rotate_sketch and plain.group_size(128) == 32
    assert EntmaxKVConfig(sketch_rotation=True).rotate_sketch
    with pytest.raises(ValueError, match="sketch_rotation"):
        EntmaxKVConfig(sketch_rotation="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_certified_rotated_int4_is_exact(alpha: float) -> None:
    q, k, v, bias = make_inputs(5)
    out, stats, ref = run("certified", q, k, v, bias, alpha, sketch="int4")
    assert stats.certified.all() and not stats.fallback.any()
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_auto_resolves_by_cache_length(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default policy runs ``dense`` below the crossover and ``certified`` from it, where sequences
    shorter than the crossover (``min_context``) decode densely; both are exact."""
    import entmaxkv_compile.config as config_mod

    cfg = EntmaxKVConfig()
    assert cfg.policy == "auto"
    assert cfg.resolve(config_mod.AUTO_CERTIFIED_FROM - 1).policy == "dense"
    long = cfg.resolve(config_mod.AUTO_CERTIFIED_FROM)
    assert long.policy == "certified" and long.min_context == config_mod.AUTO_CERTIFIED_FROM
    assert EntmaxKVConfig(policy="certified").resolve(10) == EntmaxKVConfig(policy="certified")
    monkeypatch.setattr(config_mod, "AUTO_CERTIFIED_FROM", 60)  # a short cache stands in for a long one
    q, k, v, bias = make_inputs(11, s=64)
    bias[1, ..., 50:] = -math.inf  # row 1: at most 50 valid positions, below the crossover
    out, stats, ref = run("auto", q, k, v, bias, 1.5)
    assert stats.policy == "certified" and stats.fallback.tolist() == [[False] * 2, [True] * 2]
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    out, stats, ref = run("auto", q[:, :, :, :], k[:, :, :40], v[:, :, :40], bias[..., :40], 1.5)
    assert stats.policy == "dense"
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["dense", "topk", "adaptive", "certified"])
def test_cuda_matches_cpu(policy: str) -> None:
    q, k, v, bias = make_inputs(11, lq=2, s=300, aligned=3, use_alibi=True, dtype=torch.bfloat16)
    cfg = EntmaxKVConfig(policy=policy, min_candidates=32, budget_pages=4)
    cpu, _ = decode_attention(q, k, v, scale=0.2, alpha=1.5, bias=bias, config=cfg)
    gpu, stats = decode_attention(
        *(x.cuda() for x in (q, k, v)), scale=0.2, alpha=1.5, bias=bias.cuda(), config=cfg
    )
    assert stats.certified.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-2, rtol=0)
