"""Hugging Face decoders with ``attn_implementation="entmax15"/"sparsemax"`` under the entmaxkv backend."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import (
    CompileConfig,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    StaticCache,
)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

import entmaxkv_compile.hf as hf
from entmaxkv_compile.backend import backend
from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.explain import explain
from entmaxkv_compile.reference.entmax import entmax

CONFIG = EntmaxKVConfig(min_candidates=16, candidate_fraction=0.25, inner_compiler="aot_eager")
SIZES = dict(
    vocab_size=97, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
)  # fmt: skip
PROMPT, STEPS, WARMUP = 13, 6, 2
# transformers >= 5.24 renames past_key_values to cache; the GPU image's 5.17 only knows the old name
pytestmark = [
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("fresh_dynamo"),
]


def llama(attn: str = "entmax15") -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SIZES, attn_implementation=attn)).eval()


def qwen2(attn: str = "sparsemax") -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**SIZES, attn_implementation=attn)).eval()


def decode_loop(model, make_cache, steps: int = STEPS) -> None:
    """Eager and compiled decoding from the same prefill; logits must agree at every step."""
    ids = torch.randint(0, model.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    eager_cache, compiled_cache = make_cache(), make_cache()
    compiled = torch.compile(model, backend=backend(CONFIG))
    with torch.no_grad():
        tok = model(ids, past_key_values=eager_cache).logits[:, -1:].argmax(-1)
        model(ids, past_key_values=compiled_cache)
        for i in range(steps):
            ref = model(tok, past_key_values=eager_cache).logits
            if i < WARMUP:
                out = compiled(tok, past_key_values=compiled_cache).logits
            else:
                with torch.compiler.set_stance("fail_on_recompile"):
                    out = compiled(tok, past_key_values=compiled_cache).logits
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
            tok = ref.argmax(-1)


def test_attention_function_is_dense_entmax() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, 4, 3, 32, generator=g),
        torch.randn(2, 2, 9, 32, generator=g),
        torch.randn(2, 2, 9, 32),
    )
    mask = torch.rand(2, 1, 3, 9, generator=g) > 0.3
    mask[..., 0] = True
    module = torch.nn.Module()
    out, weights = hf.entmax_attention(module, q, k, v, mask, scaling=0.2, alpha=1.5)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.2).masked_fill(~mask, float("-inf"))
    ref = (entmax(scores, 1.5) @ v.repeat_interleave(2, 1)).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    assert weights is None
    assert {"entmax15", "sparsemax", "entmax"} <= set(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping)


def test_llama_static_cache() -> None:
    model = llama()
    decode_loop(model, lambda: StaticCache(config=model.config, max_cache_len=40))
    assert counters["entmaxkv"]["graphs"] == 1
    assert counters["entmaxkv"]["decode_attn"] == 2
    assert counters["entmaxkv"]["left_dense"] == 0


def test_qwen2_dynamic_cache() -> None:
    model = qwen2()
    decode_loop(model, lambda: DynamicCache(config=model.config))
    assert counters["entmaxkv"]["graphs"] == 2  # the second step recompiles with a dynamic length, then never
    assert counters["entmaxkv"]["decode_attn"] == 4


def test_llama_generate_static_cache() -> None:
    model = llama()
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    compile_config = CompileConfig(backend=backend(CONFIG), fullgraph=True)
    compile_config._compile_all_devices = True  # transformers auto-compiles decode on GPUs only by default
    kwargs = dict(max_new_tokens=8, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        ref = model.generate(ids, **kwargs)
        out = model.generate(ids, compile_config=compile_config, **kwargs)
    assert torch.equal(out, ref)
    assert counters["entmaxkv"]["decode_attn"] == 2


def prefilled(model, ids: torch.Tensor) -> StaticCache:
    cache = StaticCache(config=model.config, max_cache_len=40)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    return cache


def test_explain_does_not_touch_the_cache() -> None:
    model = llama()
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT))
    cache = prefilled(model, ids)
    before = copy.deepcopy(cache)
    report = explain(model, ids[:, :1], past_key_values=cache, config=CONFIG)
    assert [(m.kind, m.num_heads, m.num_kv_heads, m.query_len) for m in report.matched] == [
        ("entmax15", 4, 2, 1)
    ] * 2
    assert report.matched[1].where.startswith("model.layers.1.self_attn")
    assert report.unmatched == [] and report.complete
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(cache.layers, before.layers))
    assert int(cache.layers[0].cumulative_length) == PROMPT  # the cache was not advanced


def test_explain_softmax_model_reports_sites() -> None:
    model = llama("eager")
    ids = torch.randint(0, model.config.vocab_size, (1, PROMPT))
    report = explain(model, ids[:, :1], past_key_values=prefilled(model, ids), config=CONFIG)
    assert report.matched == []
    assert [u.kind for u in report.unmatched] == ["softmax", "softmax"]
    assert "softmax attention" in str(report)
