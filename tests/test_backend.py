"""The backend itself: registration, hand-off, what it must leave alone, diagnostics."""

from __future__ import annotations

import math

import entmax
import pytest
import torch
from torch._dynamo.utils import counters

from entmaxkv_compile.backend import backend, entmaxkv_backend, register, reset
from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.explain import explain
from entmaxkv_compile.passes.layout import Unsupported
from entmaxkv_compile.reference.entmax import entmax as reference_entmax
from tests.zoo.models import ZOO

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

FAST = EntmaxKVConfig(policy="dense", inner_compiler="aot_eager")


def attention(normalise, q, k, v, mask):
    """Plain GQA attention around any normaliser: q[B,4,L,D], k/v[B,2,S,D], mask[B,1,L,S] bool keep."""
    k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return normalise(scores.masked_fill(~mask, float("-inf"))) @ v


def inputs(lq: int = 1, s: int = 24, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, 32, generator=g).to(dtype) for h, n in ((4, lq), (2, s), (2, s)))
    mask = torch.ones(2, 1, lq, s, dtype=torch.bool)
    mask[1, ..., s // 2 :] = False
    return q, k, v, mask


NORMALISERS = {
    "entmax15": (lambda x: entmax.entmax15(x, dim=-1), "entmax15"),
    "sparsemax": (lambda x: entmax.sparsemax(x, dim=-1), "sparsemax"),
    "entmax_bisect": (lambda x: entmax.entmax_bisect(x, alpha=1.7), "entmax_bisect"),
    "entmax_bisect_tensor_alpha": (
        lambda x: entmax.entmax_bisect(x, alpha=torch.tensor(1.3)),
        "entmax_bisect",
    ),
    "sparsemax_bisect": (lambda x: entmax.sparsemax_bisect(x), "sparsemax"),
    "Entmax15": (entmax.Entmax15(dim=-1), "entmax15"),
    "Sparsemax": (entmax.Sparsemax(dim=-1), "sparsemax"),
    "EntmaxBisect": (entmax.EntmaxBisect(alpha=1.4), "entmax_bisect"),
    "reference": (lambda x: reference_entmax(x, alpha=1.8), "entmax"),
}


@pytest.mark.parametrize("name", sorted(NORMALISERS))
def test_every_entmax_callable_is_rewritten(name: str) -> None:
    normalise, kind = NORMALISERS[name]
    args = inputs()
    report = explain(attention, normalise, *args)
    assert [m.kind for m in report.matched] == [kind] and report.unmatched == []
    with torch.no_grad():
        out = torch.compile(attention, backend=backend(FAST))(normalise, *args)
        ref = attention(normalise, *args)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert counters["entmaxkv"]["decode_attn"] == 1


def test_entry_point() -> None:
    assert torch._dynamo.lookup_backend("entmaxkv") is entmaxkv_backend
    assert torch.equal(torch.compile(lambda x: x, backend="entmaxkv")(torch.ones(2)), torch.ones(2))
    register()  # already known through the entry point: a no-op, never "duplicate name"


def test_options_and_mode_are_accepted() -> None:
    options = {"entmaxkv.policy": "dense", "entmaxkv.inner_compiler": "aot_eager"}
    fn = torch.compile(attention, backend="entmaxkv", options=options)
    args = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            fn(NORMALISERS["entmax15"][0], *args), attention(NORMALISERS["entmax15"][0], *args)
        )
        fn2 = torch.compile(attention, backend=backend(FAST), mode="reduce-overhead")
        fn2(NORMALISERS["entmax15"][0], *args)
    assert counters["entmaxkv"]["decode_attn"] == 2


def test_prefill_is_left_dense() -> None:
    args = inputs(lq=8)
    normalise = NORMALISERS["entmax15"][0]
    report = explain(attention, normalise, *args)
    assert report.matched == [] and "prefill" in report.unmatched[0].reason
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(attention, backend=backend(FAST))(normalise, *args),
                                   attention(normalise, *args))  # fmt: skip
    assert counters["entmaxkv"]["decode_attn"] == 0 and counters["entmaxkv"]["left_dense"] == 1


def test_non_attention_sort_cumsum_graph_is_left_alone() -> None:
    def fn(x, w):
        xs, _ = torch.sort(x @ w, dim=-1, descending=True)
        return xs.cumsum(-1).clamp(min=0) @ w.T

    x, w = torch.randn(3, 1, 16), torch.randn(16, 16)
    report = explain(fn, x, w)
    assert report.matched == [] and report.unmatched == []
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fn, backend=backend(FAST))(x, w), fn(x, w))
    assert counters["entmaxkv"]["decode_attn"] == 0


def test_training_graphs_are_not_rewritten() -> None:
    normalise = NORMALISERS["entmax15"][0]
    q, k, v, mask = inputs()
    q.requires_grad_()
    out = torch.compile(attention, backend=backend(FAST))(normalise, q, k, v, mask)
    out.sum().backward()
    assert q.grad is not None
    assert counters["entmaxkv"]["grad_graphs"] >= 1 and counters["entmaxkv"]["decode_attn"] == 0


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("float64", "dtype torch.float64"),
        ("alpha_too_big", "not α-entmax"),
        ("runtime_alpha", "runtime tensor"),
        ("head_dim_for_certified", "sketch_group"),
    ],
)
def test_unsupported_sites_stay_dense_with_a_reason(case: str, reason: str) -> None:
    q, k, v, mask = inputs(dtype=torch.float64 if case == "float64" else torch.float32)
    config = FAST
    normalise, extra = NORMALISERS["entmax15"][0], ()
    if case == "alpha_too_big":
        normalise = lambda x: entmax.entmax_bisect(x, alpha=2.5, n_iter=30)  # noqa: E731
    elif case == "runtime_alpha":
        extra = (torch.tensor(1.3),)
    elif case == "head_dim_for_certified":
        q, k, v = q[..., :16], k[..., :16], v[..., :16]
        config = FAST.replace(policy="certified", sketch_group=32)

    def fn(q, k, v, mask, *alpha):
        norm = (lambda x: entmax.entmax_bisect(x, alpha=alpha[0] + 0)) if alpha else normalise
        return attention(norm, q, k, v, mask)

    report = explain(fn, q, k, v, mask, *extra, config=config)
    assert report.matched == [] and reason in report.unmatched[0].reason, report
    with torch.no_grad():
        out = torch.compile(fn, backend=backend(config))(q, k, v, mask, *extra)
    torch.testing.assert_close(out, fn(q, k, v, mask, *extra))
    assert counters["entmaxkv"]["decode_attn"] == 0


def test_on_unsupported_error_raises() -> None:
    q, k, v, mask = inputs(dtype=torch.float64)
    fn = torch.compile(attention, backend=backend(FAST, on_unsupported="error"))
    with torch.no_grad(), pytest.raises(Exception, match="dtype torch.float64"):
        fn(NORMALISERS["entmax15"][0], q, k, v, mask)


def test_explain_report_reads_well() -> None:
    report = explain(attention, NORMALISERS["entmax15"][0], *inputs())
    text = str(report)
    assert text.startswith("entmaxkv: 1 site(s) rewritten, 0 left dense, in 1 graph(s)")
    assert "entmax15 α=1.5 Hq=4 Hkv=2 Lq=1 at attention (test_backend.py" in text


def test_reset_without_gpu_state() -> None:
    reset()


def test_inductor_reduce_overhead_end_to_end() -> None:
    """The real hand-off: Inductor (C++ codegen on CPU, ~15 s cold) with mode="reduce-overhead"."""
    from tests.test_zoo import decode

    spec = ZOO["hf_eager_entmax15"]
    for ref, out in decode(spec, EntmaxKVConfig(min_candidates=16), steps=3, mode="reduce-overhead"):
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert counters["entmaxkv"]["decode_attn"] == spec.layers


def test_unsupported_is_an_exception_with_the_reason() -> None:
    assert str(Unsupported("why")) == "why"


@pytest.mark.parametrize("budget", [2, 64])
@torch.no_grad()
def test_softmax_topk_opt_in(budget):
    """Softmax attention is rewritten only on opt-in, to Quest-style top-k (budget ≥ pages: dense softmax)."""
    from entmaxkv_compile.reference.decode import softmax_topk_decode

    q, k, v, mask = inputs(s=100)
    fn = lambda q, k, v, mask: attention(lambda x: torch.softmax(x, dim=-1), q, k, v, mask)  # noqa: E731
    cfg = FAST.replace(softmax_topk=True, page_size=8, budget_pages=budget, sink_pages=1, recent_pages=1)
    out = torch.compile(fn, backend=backend(cfg), fullgraph=True)(q, k, v, mask)
    assert counters["entmaxkv"]["decode_attn"] == 1
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    want = softmax_topk_decode(q, k, v, scale=32**-0.5, bias=bias, config=cfg)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    dense = fn(q, k, v, mask)
    if budget >= 13:  # 100 tokens / 8 = 13 pages: everything is selected
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    else:  # a real selection: 4 of 13 pages, so the output differs from dense softmax
        assert not torch.allclose(out, dense, atol=1e-3)
    torch._dynamo.reset()
    counters.clear()
    torch.compile(fn, backend=backend(cfg.replace(softmax_topk=False)), fullgraph=True)(q, k, v, mask)
    assert counters["entmaxkv"]["decode_attn"] == 0


def test_softmax_topk_nan_and_masked_rows():
    """Fully masked rows give 0; a NaN/+inf score makes its row NaN like eager softmax, even when the
    selection drops that token; other rows are unaffected."""
    from entmaxkv_compile.reference.decode import softmax_topk_decode

    q, k, v, mask = inputs(s=100)
    cfg = FAST.replace(softmax_topk=True, page_size=8, budget_pages=2, sink_pages=1, recent_pages=1)
    bias = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    base = softmax_topk_decode(q, k, v, scale=32**-0.5, bias=bias, config=cfg)
    bias[0] = float("-inf")  # batch row 0: nothing to attend
    k2 = k.clone()
    k2[1, 0, 40] = float("nan")  # batch row 1, KV head 0: one NaN key in a middle page
    out = softmax_topk_decode(q, k2, v, scale=32**-0.5, bias=bias, config=cfg)
    assert (out[0] == 0).all()
    g = q.shape[1] // k.shape[1]
    assert out[1, :g].isnan().all() and not out[1, g:].isnan().any()
    torch.testing.assert_close(out[1, g:], base[1, g:])
    eager = torch.softmax((q[1:2, :g] @ k2[1:2, :1].transpose(-1, -2)) * 32**-0.5, -1)
    assert eager.isnan().all()  # what eager gives for those rows
