"""Bad-input catalogue (docs/RELIABILITY.md): each row gives a clear error, or a logged dense fallback,
or the exact answer — never a silent wrong one. The op is called as the rewritten graph calls it."""

from __future__ import annotations

import logging
import math

import entmax
import pytest
import torch
from torch import Tensor
from torch._dynamo.utils import counters

import entmaxkv_compile.passes  # noqa: F401  (registers the entmax polyfills and the ops)
from entmaxkv_compile.backend import backend
from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.ops.decode import config_to_json
from entmaxkv_compile.reference.decode import dense_decode

OP = torch.ops.entmaxkv.decode_attn
EXACT = ("dense", "certified", "topk")  # topk is exact whenever its budget covers the cache


def cfg(policy: str = "certified", **kw) -> str:
    base = {"min_candidates": 1, "candidate_fraction": 0.25, "sketch_group": 8, "page_size": 4}
    return config_to_json(EntmaxKVConfig(policy=policy, **{**base, **kw}))


def qkv(b: int = 2, hq: int = 4, hkv: int = 2, s: int = 21, d: int = 16, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for h, n in ((hq, 1), (hkv, s), (hkv, s)))
    return q.to(device, dtype), (2 * k).to(device, dtype), v.to(device, dtype)


def dense(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None = None) -> Tensor:
    return dense_decode(q, k, v, scale=q.shape[-1] ** -0.5, alpha=1.5, bias=bias)


def run(q, k, v, bias=None, policy="certified", **kw) -> Tensor:
    return OP(q, k, v, bias, q.shape[-1] ** -0.5, 1.5, 0, cfg(policy, **kw))


def test_integer_tensors_raise_type_error() -> None:
    q, k, v = qkv()
    with pytest.raises(TypeError, match="floating-point"):
        run(q.int(), k.int(), v.int())


def test_float64_site_is_left_dense_with_correct_answer(caplog) -> None:
    q, k, v = qkv(dtype=torch.float64)

    def attn(q, k, v):
        return entmax.entmax15(q @ k.repeat_interleave(2, 1).mT * 0.25, dim=-1) @ v.repeat_interleave(2, 1)

    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        out = torch.compile(attn, backend=backend(inner_compiler="eager"))(q, k, v)
    torch.testing.assert_close(out, attn(q, k, v))
    assert counters["entmaxkv"]["decode_attn"] == 0


def test_float64_op_call_is_exact() -> None:
    q, k, v = qkv(dtype=torch.float64)
    torch.testing.assert_close(run(q, k, v), dense(q, k, v))


def test_alpha_outside_range_raises() -> None:
    q, k, v = qkv()
    for alpha in (0.5, 2.5, -1.0):  # (α = 1 is the op's softmax top-k mode, on the softmax_topk opt-in)
        with pytest.raises(ValueError, match=r"outside \(1, 2\]"):
            OP(q, k, v, None, 0.25, alpha, 0, cfg())


def test_alpha_outside_range_site_is_left_dense_and_logged(caplog) -> None:
    q, k, v = qkv()
    attn = lambda q, k, v: entmax.entmax_bisect(q @ k.mT, alpha=2.5, dim=-1) @ v  # noqa: E731
    torch._dynamo.reset()
    counters.clear()
    with caplog.at_level(logging.INFO, logger="entmaxkv_compile"), torch.no_grad():
        out = torch.compile(attn, backend=backend(inner_compiler="eager"))(q[:, :2], k, v)
    torch.testing.assert_close(out, attn(q[:, :2], k, v))
    assert counters["entmaxkv"]["decode_attn"] == 0


@pytest.mark.parametrize("policy,sketch", [*((p, "int8") for p in EXACT), ("certified", "int4")])
@pytest.mark.parametrize("scale", [-1.0, -0.25, 0.0])
def test_non_positive_scale_is_exact(policy: str, sketch: str, scale: float) -> None:
    """A direct op call may pass any scale; the certified bounds use |scale| (the pass only rewrites > 0)."""
    q, k, v = qkv(s=64)
    out = OP(q, k, v, None, scale, 1.5, 0, cfg(policy, sketch=sketch))
    torch.testing.assert_close(out, dense_decode(q, k, v, scale=scale, alpha=1.5), atol=1e-5, rtol=1e-5)


def test_kernels_refuse_a_non_positive_scale() -> None:
    from entmaxkv_compile.ops.cuda import unsupported_reason

    q, k, v = qkv()
    for scale in (-0.25, 0.0, math.inf):
        assert "positive finite scale" in unsupported_reason(q, k, v, None, scale, EntmaxKVConfig())


def test_wrong_rank_raises() -> None:
    q, k, v = qkv()
    with pytest.raises(ValueError, match="4-D"):
        run(q[0], k[0], v[0])


@pytest.mark.parametrize("policy", EXACT)
def test_nan_and_inf_propagate_like_eager(policy: str) -> None:
    q, k, v = qkv()
    q[0, 1, 0, 3] = math.nan  # row (0, 1) is NaN
    k[1, 0, 5, 0] = math.inf  # batch 1, KV head 0 (query heads 0, 1):
    q[1, 0, 0, 0], q[1, 1, 0, 0] = 1.0, -1.0  # a +inf score (NaN in eager entmax) and a −inf one (masked)
    out, ref = run(q, k, v, policy=policy), dense(q, k, v)
    poisoned = torch.zeros(2, 4, 1, dtype=torch.bool)
    poisoned[0, 1] = poisoned[1, 0] = True
    assert torch.equal(out.isnan().all(-1), poisoned) and not out[~poisoned].isnan().any()
    torch.testing.assert_close(out[~poisoned], ref[~poisoned], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", EXACT)
def test_fully_masked_row_gives_zeros(policy: str) -> None:
    """Eager ``entmax15`` crashes on an all −inf row; the op defines the empty attention as 0."""
    q, k, v = qkv()
    bias = torch.zeros(2, 1, 1, 21)
    bias[1] = -math.inf
    out = run(q, k, v, bias, policy)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out[0], dense(q, k, v, bias)[0], atol=1e-5, rtol=1e-5)


def test_empty_cache_raises() -> None:
    q, k, v = qkv(s=0)
    with pytest.raises(ValueError, match="empty"):
        run(q, k, v)


@pytest.mark.parametrize("policy", EXACT)
@pytest.mark.parametrize("s", [1, 3])
def test_cache_shorter_than_a_page_is_exact(policy: str, s: int) -> None:
    q, k, v = qkv(s=s)
    torch.testing.assert_close(run(q, k, v, policy=policy, page_size=16), dense(q, k, v))


def test_budget_larger_than_cache_is_exact() -> None:
    q, k, v = qkv(s=37)
    torch.testing.assert_close(run(q, k, v, policy="topk", budget_pages=64), dense(q, k, v))


@pytest.mark.parametrize("policy", EXACT)
def test_batch_rows_of_very_different_lengths(policy: str) -> None:
    q, k, v = qkv(b=3, s=64)
    lengths = torch.tensor([64, 2, 17])
    bias = torch.zeros(3, 1, 1, 64).masked_fill(
        (torch.arange(64) >= lengths[:, None])[:, None, None], -math.inf
    )
    kw = {"budget_pages": 64} if policy == "topk" else {}
    torch.testing.assert_close(run(q, k, v, bias, policy, **kw), dense(q, k, v, bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("policy", EXACT)
def test_non_contiguous_and_strided_caches(policy: str) -> None:
    q, k, v = qkv(s=40)
    big_k = torch.zeros(2, 40, 2, 32)
    big_k[..., ::2] = k.transpose(1, 2)  # [B, S, H, 2D] buffer, every other channel: strided view
    ks = big_k[..., ::2].transpose(1, 2)
    vs = v.transpose(2, 3).contiguous().transpose(2, 3)  # column-major head dim
    assert not ks.is_contiguous() and not vs.is_contiguous()
    kw = {"budget_pages": 64} if policy == "topk" else {}
    torch.testing.assert_close(run(q, ks, vs, policy=policy, **kw), dense(q, k, v), atol=1e-5, rtol=1e-5)


def test_head_dim_the_kernels_lack_still_exact_on_cpu() -> None:
    q, k, v = qkv(d=24)
    torch.testing.assert_close(run(q, k, v, sketch_group=8), dense(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_cpu_tensors_on_the_gpu_path_raise() -> None:
    q, k, v = qkv(device="cuda")
    with pytest.raises(ValueError, match="one device"):
        run(q, k.cpu(), v)


@pytest.mark.gpu
def test_gpu_unsupported_head_dim_falls_back_logged(caplog) -> None:
    q, k, v = qkv(d=48, device="cuda", dtype=torch.float16)
    with caplog.at_level(logging.INFO, logger="entmaxkv_compile"):
        out = run(q, k, v, policy="dense", sketch_group=16)
    torch.testing.assert_close(out.float(), dense(q, k, v).float(), atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["dense", "certified"])
def test_gpu_nan_masked_ragged_strided(policy: str) -> None:
    q, k, v = qkv(b=3, s=300, d=64, device="cuda", dtype=torch.float16)
    bias = torch.zeros(3, 1, 1, 300, device="cuda")
    bias[0, ..., 3:] = -math.inf  # ragged
    bias[2] = -math.inf  # fully masked row
    out = run(q, k, v, bias, policy)
    torch.testing.assert_close(out[:2].float(), dense(q, k, v, bias)[:2].float(), atol=2e-3, rtol=2e-3)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    ks = k.transpose(2, 3).contiguous().transpose(2, 3)  # non-unit head-dim stride: reference fallback
    torch.testing.assert_close(
        run(q, ks, v, None, policy).float(), dense(q, k, v).float(), atol=2e-3, rtol=2e-3
    )


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["dense", "certified"])
def test_gpu_nan_in_one_head_stays_in_its_row(policy: str) -> None:
    q, k, v = qkv(s=300, d=64, device="cuda", dtype=torch.float16)
    q[0, 1, 0, 3] = math.nan
    out, ref = (
        run(q, k, v, None, policy, sketch_group=32),
        dense(q.cpu().float(), k.cpu().float(), v.cpu().float()),
    )
    assert out[0, 1].isnan().all()
    out[0, 1] = 0
    ref[0, 1] = 0
    torch.testing.assert_close(out.float().cpu(), ref, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["topk", "adaptive"])
def test_gpu_nan_query_row_leaves_the_page_ranking_to_its_group(policy: str) -> None:
    """A NaN query row takes no part in its group's page ranking: the other row of the group gets the pages
    the reference (the CPU op) gives it."""
    q, k, v = qkv(s=300, d=64)
    q[0, 1, 0, 3] = math.nan
    kw = {"page_size": 16, "budget_pages": 4, "recent_pages": 1, "sink_pages": 0}
    out = run(q.cuda(), k.cuda(), v.cuda(), None, policy, **kw).cpu()
    ref = run(q, k, v, None, policy, **kw)
    assert out[0, 1].isnan().all() and ref[0, 1].isnan().all()
    out[0, 1] = 0
    ref[0, 1] = 0
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["dense", "certified"])
def test_gpu_cache_beyond_2_pow_31_elements(policy: str) -> None:
    """k, v [1, 1, 2^25 + 1024, 64] fp16 (> 2^31 elements each, 4 GiB): only the last 700 slots are valid,
    so every address the kernels touch lies past 2^31 elements."""
    s = 2**25 + 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.zeros(1, 1, s, 64, device="cuda", dtype=torch.float16)  # masked slots: finite, not garbage
    v = torch.zeros_like(k)
    k[:, :, -1024:].normal_(generator=g)
    v[:, :, -1024:].normal_(generator=g)
    assert k.numel() > 2**31
    q = torch.randn(1, 4, 1, 64, device="cuda", dtype=torch.float16, generator=g)
    bias = torch.full((1, 1, 1, s), -math.inf, device="cuda")
    bias[..., -700:] = 0
    out = run(q, k, v, bias, policy, sketch_group=32)
    tail = [t[:, :, -1024:].cpu().float() for t in (k, v)]
    ref = dense(q.cpu().float(), *tail, bias[..., -1024:].cpu())
    torch.testing.assert_close(out.float().cpu(), ref, atol=2e-3, rtol=2e-3)
