"""State safety and recompiles: a new sequence, two models, two caches, a reallocated cache — never stale
silently; recompiles do not grow with the decode length; a CUDA graph of a decode step replays exactly.

CPU: the reference path of ``decode_attn`` keeps no state (checked). CUDA: each rewritten site owns page
metadata / sketches (``ops/cuda.py``); the ``gpu`` tests drive that state through the public op.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import Tensor
from torch._dynamo.utils import counters

import entmaxkv_compile
from entmaxkv_compile.backend import backend
from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.ops.decode import config_to_json
from entmaxkv_compile.reference.decode import decode_attention, dense_decode
from tests.compile_counts import dynamo_compiles
from tests.zoo.models import ZOO

OP = torch.ops.entmaxkv.decode_attn
CONFIG = EntmaxKVConfig(min_candidates=8, candidate_fraction=0.25, inner_compiler="eager")
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def decode_pair(eager, compiled, ids: Tensor, start: int, steps: int) -> None:
    """Prefill both (eagerly), decode ``steps`` tokens; compiled == eager at every step."""
    with torch.no_grad():
        tok = eager(ids, torch.tensor(start))[:, -1:].argmax(-1)
        compiled._orig_mod(ids, torch.tensor(start))
        for i in range(steps):
            pos = torch.tensor(start + ids.shape[1] + i)
            ref, out = eager(tok, pos), compiled(tok, pos)
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
            tok = ref.argmax(-1)


def test_cpu_op_is_stateless_across_caches_on_one_site() -> None:
    g = torch.Generator().manual_seed(0)
    cfg = config_to_json(CONFIG.replace(min_candidates=1, sketch_group=8))
    q = torch.randn(1, 2, 1, 16, generator=g)
    for s in (40, 7, 40):  # longer, then a shorter new sequence, then other content of the first length
        k, v = torch.randn(1, 2, s, 16, generator=g), torch.randn(1, 2, s, 16, generator=g)
        out = OP(q, k, v, None, 0.25, 1.5, 12345, cfg)  # one site id throughout
        torch.testing.assert_close(out, dense_decode(q, k, v, scale=0.25, alpha=1.5))


def test_new_sequence_in_the_same_compiled_model() -> None:
    spec = ZOO["hf_eager_entmax15"]
    eager = spec.build()
    compiled = torch.compile(copy.deepcopy(eager), backend=backend(CONFIG))
    g = torch.Generator().manual_seed(3)
    decode_pair(eager, compiled, torch.randint(0, spec.vocab, (2, 20), generator=g), 0, 6)
    entmaxkv_compile.reset(compiled)
    # a new, shorter sequence overwrites the same cache buffers
    with torch.compiler.set_stance("fail_on_recompile"):
        decode_pair(eager, compiled, torch.randint(0, spec.vocab, (2, 5), generator=g), 0, 4)
    assert counters["entmaxkv"]["decode_attn"] == spec.layers


def test_two_models_compiled_in_one_process() -> None:
    spec_a, spec_b = ZOO["hf_eager_entmax15"], ZOO["einsum_sparsemax"]
    eager_a, eager_b = spec_a.build(0), spec_b.build(1)
    comp_a = torch.compile(copy.deepcopy(eager_a), backend=backend(CONFIG))
    comp_b = torch.compile(copy.deepcopy(eager_b), backend=backend(CONFIG.replace(policy="dense")))
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for m in (eager_a, eager_b, comp_a._orig_mod, comp_b._orig_mod):
            m(ids, torch.tensor(0))
        tok = ids[:, -1:]
        for i in range(5):  # interleaved steps: sites of one model never see the other's caches
            pos = torch.tensor(12 + i)
            torch.testing.assert_close(comp_a(tok, pos), eager_a(tok, pos), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(comp_b(tok, pos), eager_b(tok, pos), atol=1e-4, rtol=1e-4)
    assert counters["entmaxkv"]["decode_attn"] == spec_a.layers + spec_b.layers


def test_cache_reallocated_by_the_user() -> None:
    spec = ZOO["hf_eager_entmax15"]
    eager = spec.build()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend=backend(CONFIG))
    ids = torch.randint(0, spec.vocab, (2, 15), generator=torch.Generator().manual_seed(5))
    decode_pair(eager, compiled, ids, 0, 3)
    for m in (eager, model):  # the user swaps in fresh cache tensors (e.g. moved, resized, re-created)
        for layer in m.layers:
            layer.k_cache, layer.v_cache = layer.k_cache.clone(), layer.v_cache.clone()
    with torch.no_grad():
        tok = torch.zeros(2, 1, dtype=torch.long)
        for i in range(3):
            pos = torch.tensor(18 + i)
            torch.testing.assert_close(compiled(tok, pos), eager(tok, pos), atol=1e-4, rtol=1e-4)


def test_recompiles_do_not_grow_with_decode_length() -> None:
    """300 decode steps of a static-cache model (index_copy_, positions as tensors): one compile (the GPU
    version, with Triton compilations counted too: tests/gpu/test_gpu_recompiles.py)."""
    spec = dataclasses.replace(ZOO["hf_eager_entmax15"], max_len=320, layers=1, batch=1, head_dim=16)
    eager = spec.build()
    compiled = torch.compile(copy.deepcopy(eager), backend=backend(CONFIG.replace(policy="dense")))
    ids = torch.randint(0, spec.vocab, (1, 4), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        eager(ids, torch.tensor(0))
        compiled._orig_mod(ids, torch.tensor(0))
        tok = torch.full((1, 1), int(ids[0, -1]))  # the same strides as the argmax tokens that follow
        for i in range(300):
            pos = torch.tensor(4 + i)
            if i == 1:
                warm = dynamo_compiles()
            ctx = (
                torch.compiler.set_stance("fail_on_recompile") if i else torch.compiler.set_stance("default")
            )
            with ctx:
                out = compiled(tok, pos)
            if i % 50 == 0 or i == 299:
                torch.testing.assert_close(out, eager(tok, pos), atol=1e-4, rtol=1e-4)
            else:
                eager(tok, pos)  # keep the eager cache in step
            tok = out.argmax(-1)
    assert dynamo_compiles() == warm  # Triton is not counted here: the CPU op runs the reference
    assert counters["entmaxkv"]["graphs"] == 1 and counters["entmaxkv"]["decode_attn"] == 1


# ---------------------------------------------------------------- GPU: the per-site state of ops/cuda.py

GPU_CFG = EntmaxKVConfig(min_candidates=64, candidate_fraction=0.1, page_size=16, budget_pages=4)
TOL = {"atol": 2e-3, "rtol": 2e-3}


def gpu_cache(cap: int = 1024, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(2, 8, 1, 64, device="cuda", generator=g, dtype=torch.float16)
    k = torch.randn(2, 2, cap, 64, device="cuda", generator=g, dtype=torch.float16) * 2
    v = torch.randn(2, 2, cap, 64, device="cuda", generator=g, dtype=torch.float16)
    return q, k, v


def length_bias(lengths: list[int], cap: int) -> Tensor:
    n = torch.tensor(lengths, device="cuda")
    keep = torch.arange(cap, device="cuda")[None] < n[:, None]
    return torch.zeros(len(lengths), 1, 1, cap, device="cuda").masked_fill(~keep[:, None, None], -math.inf)


def oracle(q, k, v, bias, policy: str) -> Tensor:
    """The reference of the same policy (``topk`` is approximate: compare like with like)."""
    cfg = GPU_CFG.replace(policy=policy)
    return decode_attention(q.cpu(), k.cpu(), v.cpu(), scale=0.125, alpha=1.5, bias=bias.cpu(), config=cfg)[0]


def check(q, k, v, bias, site: int, policy: str) -> None:
    out = OP(q, k, v, bias, 0.125, 1.5, site, config_to_json(GPU_CFG.replace(policy=policy)))
    torch.testing.assert_close(out.float().cpu(), oracle(q, k, v, bias, policy).float(), **TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["certified", "topk"])
def test_gpu_new_sequence_detected_and_reset(policy: str) -> None:
    site = 900_001 + (policy == "topk")
    q, k, v = gpu_cache()
    for n in range(300, 340):  # grow across page boundaries
        check(q, k, v, length_bias([n, n - 100], 1024), site, policy)
    k[:, :, :200].normal_()  # a new sequence in the same buffers, shorter: detected on device
    check(q, k, v, length_bias([200, 150], 1024), site, policy)
    k[:, :, :400].normal_()  # a new sequence longer than the old one: the user calls reset()
    entmaxkv_compile.reset()
    check(q, k, v, length_bias([400, 390], 1024), site, policy)


@pytest.mark.gpu
def test_gpu_new_sequence_one_longer_without_reset() -> None:
    """Content rewritten and length + 1 looks like an append: must still be exact (certified)."""
    site = 900_010
    q, k, v = gpu_cache()
    check(q, k, v, length_bias([300, 300], 1024), site, "certified")
    k[:, :, :301] = torch.randn_like(k[:, :, :301]) * 3
    check(q, k, v, length_bias([301, 301], 1024), site, "certified")


@pytest.mark.gpu
def test_gpu_two_caches_two_sites_and_reallocation() -> None:
    qa, ka, va = gpu_cache(seed=1)
    qb, kb, vb = gpu_cache(512, seed=2)
    for n in range(100, 120):  # two sites interleaved, different caches
        check(qa, ka, va, length_bias([n, n], 1024), 900_020, "certified")
        check(qb, kb, vb, length_bias([n + 50, n], 512), 900_021, "certified")
    check(qb, kb, vb, length_bias([130, 130], 512), 900_020, "certified")  # site fed another cache
    k2 = ka.clone()  # the user reallocates (same content, new storage), then changes it
    k2[:, :, :50] *= -1
    check(qa, k2, va, length_bias([121, 121], 1024), 900_020, "certified")


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["certified", "topk", "dense"])
def test_gpu_cuda_graph_replay_across_a_page_boundary(policy: str) -> None:
    q, k, v = gpu_cache(seed=3)
    n0 = 250  # replays cover lengths 250..260: the page boundary at 256
    bias = length_bias([n0, n0 - 7], 1024)
    cfg = config_to_json(GPU_CFG.replace(policy=policy))
    site = 900_030 + ["certified", "topk", "dense"].index(policy)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            OP(q, k, v, bias, 0.125, 1.5, site, cfg)  # warm up: Triton compiles, state allocated
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = OP(q, k, v, bias, 0.125, 1.5, site, cfg)
    for n in range(n0, n0 + 11):
        bias.copy_(length_bias([n, n - 7], 1024))
        q.normal_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float().cpu(), oracle(q, k, v, bias, policy).float(), **TOL)
