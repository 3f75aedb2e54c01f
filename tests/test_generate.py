"""Long-context generation helpers and examples/generate_long.py on CPU (tiny Llama, entmax attention)."""

from __future__ import annotations

import runpy
import sys

import pytest
import torch
from torch._dynamo.utils import counters

from entmaxkv_compile import generate
from entmaxkv_compile.backend import backend
from entmaxkv_compile.config import EntmaxKVConfig

PROMPT, CACHE = 150, 170
pytestmark = [
    pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning"),
    pytest.mark.usefixtures("fresh_dynamo"),
]


@pytest.fixture(scope="module")
def model():
    return generate.build_model("tiny", max_positions=256)


def prompt(n: int = PROMPT) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(3))


def test_chunked_prefill_equals_one_shot(model) -> None:
    """Query chunks over the visible keys give the same logits and cache as one dense entmax pass."""
    chunked, whole = generate.new_cache(model, CACHE), generate.new_cache(model, CACHE)
    logits = generate.prefill(model, prompt(), chunked, chunk=37)
    with torch.no_grad():
        ref = model(prompt(), past_key_values=whole).logits[:, -1]
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(chunked.layers, whole.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "entmax15"


def test_chunked_attention_reads_only_visible_keys(model) -> None:
    """Keys after the last visible one are dropped; poisoning them must not change the output."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, 4, 5, 64, generator=g),
        torch.randn(1, 2, 12, 64, generator=g),
        torch.randn(1, 2, 12, 64),
    )
    mask = (torch.arange(12)[None, :] <= torch.arange(3, 8)[:, None])[None, None]
    out, _ = generate.chunked_entmax_attention(
        model.model.layers[0].self_attn, q, k, v, mask, 0.125, alpha=1.5
    )
    k[:, :, 8:], v[:, :, 8:] = float("nan"), float("nan")
    poisoned, _ = generate.chunked_entmax_attention(
        model.model.layers[0].self_attn, q, k, v, mask, 0.125, alpha=1.5
    )
    torch.testing.assert_close(poisoned, out)
    assert not out.isnan().any()


def test_extend_cache_repeats_and_sets_length(model) -> None:
    cache = generate.new_cache(model, CACHE)
    generate.prefill(model, prompt(40), cache, chunk=40)
    generate.extend_cache(cache, 40, 100)
    keys = cache.layers[0].keys
    torch.testing.assert_close(keys[:, :, 80:100], keys[:, :, :20])
    assert generate._length(cache.layers[0]) == 100
    with pytest.raises(ValueError, match="filled"):
        generate.extend_cache(cache, 0, 10)


def test_certified_greedy_equals_eager(model) -> None:
    cache = generate.new_cache(model, CACHE)
    logits = generate.prefill(model, prompt(), cache, chunk=64)
    start = generate.snapshot(cache)
    ref, _ = generate.greedy(model, logits, cache, 8)
    generate.restore(cache, start)
    compiled = torch.compile(model, backend=backend(EntmaxKVConfig(inner_compiler="aot_eager")))
    tokens, times = generate.greedy(compiled, logits, cache, 8)
    assert tokens == ref
    assert len(times) == 8
    assert counters["entmaxkv"]["decode_attn"] == 2 and counters["frames"]["ok"] == 1


def test_generate_long_example(monkeypatch, capsys) -> None:
    argv = ["generate_long.py", "--context", "160", "--prefill-len", "120", "--steps", "6", "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path("examples/generate_long.py", run_name="__main__")
    out = capsys.readouterr().out
    assert "greedy tokens equal dense: True" in out
    assert "2 attention sites rewritten" in out


def test_reference_attention_is_the_decode_oracle(model) -> None:
    """``entmax15_reference`` = ``dense_decode`` (fp32 scores of the bf16 operands); the model's own
    attention rounds the scores to bf16 first, so it is not (that is why it is not the token reference)."""
    from entmaxkv_compile.hf import entmax_attention
    from entmaxkv_compile.reference.decode import dense_decode

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, n, s, 64, generator=g).bfloat16() for n, s in ((4, 1), (2, 40), (2, 40)))
    keep = torch.arange(40)[None, None, None, :] < 33
    module = model.model.layers[0].self_attn
    out, _ = generate.reference_entmax_attention(module, 3 * q, k, v, keep, 0.125, alpha=1.5)
    bias = torch.zeros(1, 1, 1, 40).masked_fill(~keep, float("-inf"))
    oracle = dense_decode(3 * q, k, v, scale=0.125, alpha=1.5, bias=bias)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 1, 4, 64)
    assert torch.equal(out, oracle.transpose(1, 2))
    as_written, _ = entmax_attention(module, 3 * q, k, v, keep, 0.125, alpha=1.5)
    assert not torch.equal(as_written, out)
    torch.testing.assert_close(as_written, out, atol=0.05, rtol=0.05)


def test_first_divergence() -> None:
    assert generate.first_divergence([5, 1, 2], [5, 1, 2], [3.0, 4.0]) is None
    assert generate.first_divergence([5, 1, 2], [5, 1, 7], [3.0, 0.0]) == {"token": 2, "margin_ulps": 0.0}
    assert generate.first_divergence([5, 1], [5, 1, 7], [3.0, 4.0]) == {"token": 2, "margin_ulps": None}
