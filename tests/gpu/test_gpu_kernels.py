"""GPU kernels against the reference: dtype × shape × policy matrix, CUDA graphs, caches past 2³¹ elements.

Run on a CUDA machine: ``pytest -m gpu tests/gpu/test_gpu_kernels.py`` (skipped elsewhere).
"""

from __future__ import annotations

import math

import pytest
import torch

from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.kernels import launch
from entmaxkv_compile.ops import cuda as ops_cuda
from entmaxkv_compile.reference.decode import decode_attention, dense_decode

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

NEG = -math.inf
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
POLICIES = {
    "dense": dict(policy="dense"),
    "certified-int8": dict(policy="certified", sketch="int8"),
    "certified-int8-g32": dict(policy="certified", sketch="int8", sketch_group=32),  # grouped steps
    "certified-int4": dict(policy="certified", sketch="int4", candidate_fraction=0.5),
    "topk": dict(policy="topk", budget_pages=8),
    "adaptive": dict(policy="adaptive", budget_pages=64),
}
APPROX = ("topk", "adaptive")  # compared with the reference's own policy, not with dense


def _case(b, hq, hkv, lq, s, d, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(b, hq, lq, d, device="cuda", generator=gen)
    k = torch.randn(b, hkv, s, d, device="cuda", generator=gen)
    v = torch.randn(b, hkv, s, d, device="cuda", generator=gen)
    g = hq // hkv
    for h in range(hkv):  # a few keys aligned with their group's queries: a sparse, peaky support
        idx = torch.randint(0, s, (8,), device="cuda", generator=gen)
        k[:, h, idx] += 0.5 * q[:, h * g : (h + 1) * g, 0].mean(1, keepdim=True)
    lengths = [s - 5 - 301 * i for i in range(b)]
    bias = torch.zeros(b, 1, lq, s, device="cuda")
    for i, n in enumerate(lengths):
        for j in range(lq):
            bias[i, 0, j, n - lq + j + 1 :] = NEG
    return q.to(dtype), k.to(dtype), v.to(dtype), bias


def _err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _sites():
    return iter(range(1000, 10**6))


SITE = _sites()

MATRIX = [(dt, "gqa", p, 1.5) for dt in ("bfloat16", "float16", "float32") for p in POLICIES] + [
    ("bfloat16", shape, p, alpha)
    for shape, alpha in (("mha", 2.0), ("mqa", 1.3), ("spec", 1.5))
    for p in POLICIES
]
SHAPES = {  # b, hq, hkv, lq, s, d
    "gqa": (2, 32, 8, 1, 4096, 128),
    "mha": (2, 8, 8, 1, 3000, 64),
    "mqa": (1, 16, 1, 1, 5000, 256),
    "spec": (1, 8, 2, 2, 2048, 128),
}


@pytest.mark.parametrize("dtype,shape,policy,alpha", MATRIX)
def test_matrix_matches_reference(dtype, shape, policy, alpha):
    dt = getattr(torch, dtype)
    b, hq, hkv, lq, s, d = SHAPES[shape]
    q, k, v, bias = _case(b, hq, hkv, lq, s, d, dt)
    cfg = EntmaxKVConfig(**POLICIES[policy])
    scale = d**-0.5 * 2
    site = next(SITE)
    out = ops_cuda.decode_site(q, k, v, bias, scale, alpha, site, cfg, 528)
    if policy in APPROX:
        ref, _ = decode_attention(q, k, v, scale=scale, alpha=alpha, bias=bias, config=cfg)
    else:
        ref = dense_decode(q, k, v, scale=scale, alpha=alpha, bias=bias)
    assert _err(out, ref) < TOL[dt]
    stats = ops_cuda.site_stats(site)
    if policy.startswith("certified-int8") and shape == "gqa":
        assert (stats["mode"] == 0).all()  # certified sparse, no fallback on peaky data
    # Same step again through the incremental metadata path. Equal up to rounding, not bitwise: which tokens a
    # scoring program keeps races on a shared running maximum, so a borderline group may take the workspace
    # path in one call and not in the other (seen with 16 heads per KV head at α = 1.3).
    out2 = ops_cuda.decode_site(q, k, v, bias, scale, alpha, site, cfg, 528)
    assert _err(out2, out) < TOL[dt] / 4


@pytest.mark.parametrize("inline", [True, False])
def test_workspace_fallback(inline, monkeypatch):
    """A flat head overflows its segments and is decoded from the dense workspace: written by the first
    scoring pass and solved in the same launch (``inline``, short caches), or by the two extra launches."""
    monkeypatch.setattr(launch, "WS_INLINE_MAX", 1 << 40 if inline else 0)
    b, hq, hkv, s, d = 1, 8, 2, 4096, 128
    q, k, v, bias = _case(b, hq, hkv, 1, s, d, torch.bfloat16, seed=5)
    q[:, :4] = 0  # KV head 0: equal scores, the whole cache in the support
    cfg = EntmaxKVConfig(policy="dense", min_candidates=8, candidate_fraction=0.01)
    site = next(SITE)
    out = ops_cuda.decode_site(q, k, v, bias, d**-0.5, 1.5, site, cfg, 8)  # 4 splits: segments of 256
    ref = dense_decode(q, k, v, scale=d**-0.5, alpha=1.5, bias=bias)
    assert _err(out, ref) < TOL[torch.bfloat16]
    assert ops_cuda.site_stats(site)["mode"][0].item() == 2  # the flat head went through the workspace


@pytest.mark.parametrize("policy", ["certified-int8", "certified-int4", "topk", "adaptive", "dense"])
def test_cuda_graph_replay_across_page_boundary(policy):
    b, hq, hkv, s, d = 1, 16, 4, 2048, 128
    q, k_full, v_full, _ = _case(b, hq, hkv, 1, s, d, torch.bfloat16, seed=3)
    k, v = torch.zeros_like(k_full), torch.zeros_like(v_full)
    bias = torch.full((b, 1, 1, s), NEG, device="cuda")
    cfg = EntmaxKVConfig(**POLICIES[policy], page_size=16)
    site, scale = next(SITE), d**-0.5 * 2
    length = 1018  # page boundary at 1024

    def write(n):  # the cache holds n tokens; the mask admits them
        k[:, :, :n], v[:, :, :n] = k_full[:, :, :n], v_full[:, :, :n]
        bias[..., :n] = 0.0

    def ref_out():
        if policy in APPROX:
            return decode_attention(q, k, v, scale=scale, alpha=1.5, bias=bias, config=cfg)[0]
        return dense_decode(q, k, v, scale=scale, alpha=1.5, bias=bias)

    write(length)
    step = lambda: ops_cuda.decode_site(q, k, v, bias, scale, 1.5, site, cfg, 528)  # noqa: E731
    eager = step()
    assert _err(eager, ref_out()) < TOL[torch.bfloat16]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    for n in range(length + 1, length + 12):
        write(n)
        graph.replay()
        assert _err(static_out, ref_out()) < TOL[torch.bfloat16], n
        if policy != "dense":
            assert ops_cuda.site_stats(site)["watermark"].tolist() == [n] * hkv
    eager = step()
    assert torch.equal(eager, static_out)


def test_capture_of_a_sites_first_call_is_refused():
    q, k, v, bias = _case(1, 8, 2, 1, 512, 64, torch.bfloat16)
    cfg, site = EntmaxKVConfig(policy="certified"), next(SITE)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="eager step"), torch.cuda.graph(graph):
        ops_cuda.decode_site(q, k, v, bias, 64**-0.5, 1.5, site, cfg, 528)
    assert site not in ops_cuda._sites


@pytest.mark.parametrize("policy", ["certified-int8", "topk", "adaptive"])
def test_reduce_overhead_replay_across_page_boundary(policy):
    """``torch.compile(mode="reduce-overhead")`` (cudagraph trees: warm-up inside the graph pool, then
    capture) over the op, the cache a static address written in place, replayed across a page boundary:
    equal to the eager op, and the metadata advanced incrementally (watermark) rather than rebuilt."""
    from entmaxkv_compile.ops.decode import config_to_json

    b, hq, hkv, s, d = 1, 16, 4, 2048, 128
    q, k_full, v_full, _ = _case(b, hq, hkv, 1, s, d, torch.bfloat16, seed=5)
    k, v = torch.zeros_like(k_full), torch.zeros_like(v_full)
    bias = torch.full((b, 1, 1, s), NEG, device="cuda")
    for t in (k, v, bias):
        torch._dynamo.mark_static_address(t)
    cfg = EntmaxKVConfig(**POLICIES[policy], page_size=16)
    site, scale, cfg_json = next(SITE), d**-0.5 * 2, config_to_json(cfg)

    def step(q):
        return torch.ops.entmaxkv.decode_attn(q, k, v, bias, scale, 1.5, site, cfg_json)

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    length = 1017
    for n in range(length, length + 14):  # warm-up, recording, then replays past position 1024
        k[:, :, :n], v[:, :, :n] = k_full[:, :, :n], v_full[:, :, :n]
        bias[..., :n] = 0.0
        out = compiled(q).clone()
        wm = ops_cuda.site_stats(site)["watermark"].tolist()
        if policy in APPROX:
            ref = decode_attention(q, k, v, scale=scale, alpha=1.5, bias=bias, config=cfg)[0]
        else:
            ref = dense_decode(q, k, v, scale=scale, alpha=1.5, bias=bias)
        assert _err(out, ref) < TOL[torch.bfloat16], n
        assert wm == [n] * hkv, n
    eager = torch.ops.entmaxkv.decode_attn(q, k, v, bias, scale, 1.5, site, cfg_json)
    assert _err(eager, out) < TOL[torch.bfloat16] / 4


@pytest.mark.parametrize("dtype,bias_kind", [("bfloat16", "mask"), ("float16", "alibi"), ("float32", "none")])
def test_adaptive_selects_the_reference_pages(dtype, bias_kind):
    """Keys clustered by page (narrow boxes, spread centres): the τ estimate drops pages before the budget
    does, and the kernels select exactly the reference's pages."""
    from entmaxkv_compile.kernels.launch import Scratch, SiteBuffers, decode, make_plan, selected_pages
    from entmaxkv_compile.reference.decode import _page_selection, attention_scores

    dt = getattr(torch, dtype)
    b, hq, hkv, s, d, ps = 2, 32, 8, 8192, 128, 16
    q, k, v, bias = _case(b, hq, hkv, 1, s, d, torch.float32, seed=7)
    gen = torch.Generator(device="cuda").manual_seed(8)
    centres = torch.randn(b, hkv, s // ps, 1, d, device="cuda", generator=gen)
    k = (0.1 * k + centres.expand(-1, -1, -1, ps, -1).flatten(2, 3)).to(dt)
    q, v = q.to(dt), v.to(dt)
    if bias_kind == "alibi":
        slopes = 2.0 ** -torch.arange(1, hq + 1, device="cuda")[:, None, None]
        bias = bias + slopes * (torch.arange(s, device="cuda") - s).float()
    elif bias_kind == "none":
        bias = None
    config = EntmaxKVConfig(policy="adaptive", page_size=ps, budget_pages=256)
    plan = make_plan(tuple(q.shape), tuple(k.shape), d, config, 528)
    site, sc = SiteBuffers(plan, q.device, k.dtype), Scratch(plan, q.device)
    scale = d**-0.5
    out = decode(plan, sc, site, q, k, v, bias, scale, 1.5, config)
    ref, _ = decode_attention(q, k, v, scale=scale, alpha=1.5, bias=bias, config=config)
    assert _err(out, ref) < TOL[dt]
    scores = attention_scores(q, k, scale=scale, bias=bias)
    valid = (scores > NEG).reshape(b, -1, s).any(1)
    want = _page_selection(q, k, scores, valid, scale, 1.5, bias, config)[0].reshape(plan.bh, -1)
    assert (want.sum(-1) < config.budget_pages).any()  # the estimate, not the budget, bounds a selection
    for grp in range(plan.bh):
        got = selected_pages(plan, sc, grp).tolist()
        assert got == want[grp].nonzero()[:, 0].tolist(), grp


def test_cache_past_int32_elements():
    """K and V of 16 × (2²⁰ + 128) × 128 elements (> 2³¹): int64 offsets everywhere."""
    b, hq, hkv, s, d = 1, 16, 16, 2**20 + 128, 128
    assert b * hkv * s * d > 2**31
    q, k, v, bias = _case(b, hq, hkv, 1, s, d, torch.bfloat16, seed=5)
    scale = d**-0.5 * 2
    ref = dense_decode(q, k, v, scale=scale, alpha=1.5, bias=bias)
    for policy in ("dense", "certified-int8", "certified-int4"):
        out = ops_cuda.decode_site(
            q, k, v, bias, scale, 1.5, next(SITE), EntmaxKVConfig(**POLICIES[policy]), 528
        )
        assert _err(out, ref) < TOL[torch.bfloat16], policy
    cfg = EntmaxKVConfig(policy="topk", budget_pages=64)
    out = ops_cuda.decode_site(q, k, v, bias, scale, 1.5, next(SITE), cfg, 528)
    ref = decode_attention(q, k, v, scale=scale, alpha=1.5, bias=bias, config=cfg)[0]
    assert _err(out, ref) < TOL[torch.bfloat16]


def test_auto_runs_dense_below_the_crossover_and_certified_from_it():
    """The default policy on the kernels: a cache shorter than ``AUTO_CERTIFIED_FROM`` runs the dense
    pipeline (no sketch allocated); a longer one the certified pipeline, where a row whose sequence is
    shorter than the crossover takes the dense tail on device."""
    from entmaxkv_compile.config import AUTO_CERTIFIED_FROM

    cfg = EntmaxKVConfig()
    for s in (8192, AUTO_CERTIFIED_FROM + 4096):
        q, k, v, bias = _case(2, 8, 2, 1, s, 64, torch.bfloat16, seed=6)
        bias[1, ..., 5000:] = NEG  # row 1: 5,000 valid positions
        site = next(SITE)
        out = ops_cuda.decode_site(q, k, v, bias, 0.25, 1.5, site, cfg, 528)
        assert _err(out, dense_decode(q, k, v, scale=0.25, alpha=1.5, bias=bias)) < TOL[torch.bfloat16]
        state = ops_cuda._sites[(site, q.device)]
        mode = ops_cuda.site_stats(site)["mode"].tolist()
        if s < AUTO_CERTIFIED_FROM:
            assert state.plan.policy == "dense" and not hasattr(state.buffers, "codes")
            assert mode == [1] * 4
        else:
            assert state.plan.policy == "certified" and mode == [0, 0, 1, 1]
