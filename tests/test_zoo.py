"""Every zoo decoder: the backend finds each attention site and decodes exactly like eager."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import entmaxkv_compile.passes  # noqa: F401  (registers the entmax polyfills before any tracing)
from entmaxkv_compile.backend import backend
from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.explain import explain
from tests.zoo.models import ZOO, Spec, softmax_attention

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

PROMPT, STEPS, WARMUP = 13, 6, 2  # decode positions 13..18 cross the page boundary at 16
CONFIG = EntmaxKVConfig(min_candidates=16, candidate_fraction=0.25, inner_compiler="aot_eager")


def tolerance(spec: Spec) -> dict[str, float]:
    return {"atol": 0.1, "rtol": 0.05} if spec.dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}


def decode(
    spec: Spec, config: EntmaxKVConfig, steps: int = STEPS, per_step: int = 1, mode: str | None = None
) -> list[tuple]:
    """Prefill eagerly, then decode ``steps`` steps with an eager and a compiled copy: (eager, compiled)."""
    eager = spec.build()
    model = copy.deepcopy(eager)
    ids = torch.randint(0, spec.vocab, (spec.batch, PROMPT), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend=backend(config), mode=mode)
    pairs = []
    with torch.no_grad():
        tok = eager(ids, torch.tensor(0))[:, -per_step:].argmax(-1)
        model(ids, torch.tensor(0))
        for i in range(steps):
            start = torch.tensor(PROMPT + i * per_step)
            ref = eager(tok, start)
            if i < WARMUP:
                out = compiled(tok, start)
            else:
                with torch.compiler.set_stance("fail_on_recompile"):
                    out = compiled(tok, start)
            pairs.append((ref, out))
            tok = ref.argmax(-1)
    return pairs


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_decode_matches_eager(name: str) -> None:
    spec = ZOO[name]
    pairs = decode(spec, CONFIG)
    for ref, out in pairs:
        torch.testing.assert_close(out, ref, **tolerance(spec))
    graphs = counters["entmaxkv"]["graphs"]
    assert graphs == (2 if spec.cache == "dynamic" else 1)  # dynamic: one recompile to a dynamic length
    assert counters["entmaxkv"]["decode_attn"] == spec.layers * graphs
    assert counters["entmaxkv"]["left_dense"] == 0


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_explain(name: str) -> None:
    spec = ZOO[name]
    model = spec.build()
    ids = torch.randint(0, spec.vocab, (spec.batch, PROMPT))
    with torch.no_grad():
        model(ids, torch.tensor(0))
    caches = [t.clone() for layer in model.layers for t in (layer.k_cache, layer.v_cache)]
    report = explain(model, ids[:, :1], torch.tensor(PROMPT), config=CONFIG)
    assert [m.kind for m in report.matched] == [spec.kind] * spec.layers
    assert all(
        (m.num_heads, m.num_kv_heads, m.query_len) == (spec.heads, spec.kv_heads, 1) for m in report.matched
    )
    assert all(f"layers.{i}" in m.where for i, m in enumerate(report.matched))
    assert report.unmatched == [] and report.complete
    after = [t for layer in model.layers for t in (layer.k_cache, layer.v_cache)]
    assert all(torch.equal(a, b) for a, b in zip(caches, after))  # explain never runs the graph


def test_speculative_decode_rewrites_short_query_blocks() -> None:
    spec = ZOO["hf_eager_entmax15"]
    for ref, out in decode(spec, CONFIG.replace(max_query_len=3), steps=3, per_step=3):
        torch.testing.assert_close(out, ref, **tolerance(spec))
    assert counters["entmaxkv"]["decode_attn"] == spec.layers


@pytest.mark.parametrize("policy", ["dense", "certified"])
def test_exact_policies(policy: str) -> None:
    spec = ZOO["hf_eager_entmax15"]
    for ref, out in decode(spec, CONFIG.replace(policy=policy), steps=3):
        torch.testing.assert_close(out, ref, **tolerance(spec))


def test_softmax_zoo_model_is_left_alone() -> None:
    spec = Spec(softmax_attention)
    for ref, out in decode(spec, CONFIG, steps=3):
        torch.testing.assert_close(out, ref)
    assert counters["entmaxkv"]["decode_attn"] == 0
