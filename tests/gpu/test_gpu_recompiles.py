"""Compiles do not grow with the decode length on the GPU: neither Dynamo frames nor Triton kernels.

A static-cache decoder (``tests/zoo``: HF-style entmax15 attention, fp32, GQA 8/2, head dim 64, two layers,
batch 2) compiled with ``backend="entmaxkv"`` decodes 2,048 steps from a 32-token context, so the valid
length grows ×65 (33 → 2,080 tokens) across 128 page boundaries of 16 tokens. After a 3-step warm-up,
Dynamo's compile counters and every project kernel's compiled Triton specialisations
(``tests/compile_counts.py``) stay unchanged, under ``fail_on_recompile``; every 256th step and the last
equal eager on the same cache. ``topk``'s budget covers the whole cache: its full pipeline, exact answers;
``adaptive`` likewise, its slack keeping every page past the τ estimate (which still runs every step).
The inner compiler is ``aot_eager`` (the kernels are launched by the op either way; Inductor with CUDA
graphs over 1,000 steps: ``test_gpu_hf_long.py``).
Run: ``PYTHONPATH=. python -m pytest -m gpu -q tests/gpu/test_gpu_recompiles.py`` (≤ 60 s on an H200).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import entmaxkv_compile
from entmaxkv_compile.ops import cuda as ops_cuda
from tests.compile_counts import dynamo_compiles, triton_compiles
from tests.zoo.models import ZOO

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.usefixtures("fresh_dynamo"),
]

CONTEXT, STEPS, WARMUP, SAMPLE = 32, 2048, 3, 256
SPEC = dataclasses.replace(
    ZOO["hf_eager_entmax15"], heads=8, kv_heads=2, head_dim=64, layers=2, batch=2, max_len=CONTEXT + STEPS
)
PAGE = 16
OPTIONS = {
    "certified": {},
    "topk": {"entmaxkv.budget_pages": -(-SPEC.max_len // PAGE)},  # every page of the cache
    "adaptive": {"entmaxkv.budget_pages": -(-SPEC.max_len // PAGE), "entmaxkv.adaptive_slack": 1e6},
    "dense": {},
}


@pytest.mark.parametrize("policy", list(OPTIONS))
def test_gpu_compiles_do_not_grow_over_2048_decode_steps(policy: str) -> None:
    entmaxkv_compile.register()  # the backend name without package metadata (PYTHONPATH=. checkouts)
    model = SPEC.build().cuda()
    options = {"entmaxkv.policy": policy, "entmaxkv.page_size": PAGE, "entmaxkv.inner_compiler": "aot_eager"}
    compiled = torch.compile(model, backend="entmaxkv", options={**options, **OPTIONS[policy]})
    gen = torch.Generator(device="cuda").manual_seed(0)
    sites = set(ops_cuda._sites)

    def step(i: int) -> None:
        tok = torch.randint(0, SPEC.vocab, (SPEC.batch, 1), device="cuda", generator=gen)
        pos = torch.tensor(CONTEXT + i, device="cuda")
        sampled = i % SAMPLE == 0 or i == STEPS - 1
        ref = model(tok, pos) if sampled else None  # eager first: both write the same cache slot
        out = compiled(tok, pos)
        if ref is not None:
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"step {i}: {m}")

    with torch.no_grad():
        ids = torch.randint(0, SPEC.vocab, (SPEC.batch, CONTEXT), device="cuda", generator=gen)
        model(ids, torch.tensor(0, device="cuda"))  # eager prefill into the static cache
        for i in range(WARMUP):
            step(i)
        warm = {"dynamo": dynamo_compiles(), "triton": triton_compiles()}
        with torch.compiler.set_stance("fail_on_recompile"):
            for i in range(WARMUP, STEPS):
                step(i)
        end = {"dynamo": dynamo_compiles(), "triton": triton_compiles()}
    assert counters["entmaxkv"]["decode_attn"] == SPEC.layers  # every layer rewritten …
    new_sites = sorted(s for s, _ in set(ops_cuda._sites) - sites)
    assert len(new_sites) == SPEC.layers  # … and decoded by the kernels (no reference fallback)
    assert sum(warm["triton"].values()) > 0
    changed = {k: (warm[g][k], end[g][k]) for g in warm for k in warm[g] if warm[g][k] != end[g][k]}
    assert not changed, f"compiles grew with the decode length (after warm-up, at the end): {changed}"
    if policy != "dense":  # sketches / page boxes followed every step incrementally, up to the last token
        for site in new_sites:
            wm = ops_cuda.site_stats(site)["watermark"].tolist()
            assert wm == [CONTEXT + STEPS] * (SPEC.batch * SPEC.kv_heads), (site, wm)
