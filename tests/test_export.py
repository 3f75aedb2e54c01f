"""Static-budget export end to end: torch.export rewrite, ONNX file, ONNX Runtime vs the PyTorch reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.export import export_static, to_onnx, verify_onnx
from entmaxkv_compile.export.__main__ import main
from entmaxkv_compile.export.example import TinyEntmaxDecoder, example_inputs
from entmaxkv_compile.reference.entmax import sparsemax

TOPK = [EntmaxKVConfig(policy="topk", budget_pages=b) for b in (2, 6)]
SMALL_TOPK = EntmaxKVConfig(policy="topk", budget_pages=4)
CERTIFIED = [EntmaxKVConfig(policy="certified", min_candidates=c, candidate_fraction=0.01) for c in (16, 48)]


def _decoder(alpha: float = 1.5, dtype: torch.dtype = torch.float32, **kw: int) -> TinyEntmaxDecoder:
    torch.manual_seed(0)
    return TinyEntmaxDecoder(alpha=alpha, **kw).to(dtype).eval()


def _ops(ep: torch.export.ExportedProgram) -> list[str]:
    return [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("config", TOPK[:1] + CERTIFIED[:1], ids=["topk", "certified"])
def test_every_site_becomes_the_static_op(config: EntmaxKVConfig) -> None:
    model = _decoder()
    ops = _ops(export_static(model, example_inputs(model), config=config))
    assert ops.count(f"entmaxkv.static_{config.policy}_attn.default") == 2
    assert "entmaxkv.entmax.default" not in ops
    assert "aten.matmul.default" not in ops  # neither q @ kᵀ nor p @ v is left over the whole cache


# every pair of (α, budget, dtype) values occurs once per policy; the op tests cover the full cross product
PAIRWISE = [
    (1.5, 0, torch.float32),
    (2.0, 1, torch.float32),
    (1.5, 1, torch.float16),
    (2.0, 0, torch.float16),
]


@pytest.mark.parametrize("policy", [TOPK, CERTIFIED], ids=["topk", "certified"])
@pytest.mark.parametrize(
    ("alpha", "budget", "dtype"),
    PAIRWISE,
    ids=["1.5-small-fp32", "2-large-fp32", "1.5-large-fp16", "2-small-fp16"],
)
def test_onnx_runtime_equals_reference(
    policy: list[EntmaxKVConfig], alpha: float, budget: int, dtype: torch.dtype, tmp_path: Path
) -> None:
    """2-layer GQA decoder, left-padded batch: checker, static shapes, ORT = reference, TensorRT-ready."""
    model = _decoder(alpha, dtype)
    args = example_inputs(model)
    path = tmp_path / "model.onnx"
    ep = to_onnx(model, args, path, config=policy[budget], return_selection=True)
    report = verify_onnx(path, ep.module(), args)
    assert report.ok, str(report)
    assert report.selections_equal
    assert report.max_error <= (1e-4 if dtype == torch.float32 else 1e-2)
    assert "Loop" not in report.op_counts and "NonZero" not in report.op_counts
    assert report.op_counts["TopK"] >= 4  # selection and entmax sort, in both layers


def test_onnx_rotated_int4_sketch_equals_reference(tmp_path: Path) -> None:
    """The int4 default (R·k quantised, one step per row) exports: the rotation is a constant MatMul."""
    model = _decoder()
    args = example_inputs(model)
    config = EntmaxKVConfig(policy="certified", sketch="int4", min_candidates=16, candidate_fraction=0.01)
    path = tmp_path / "model.onnx"
    ep = to_onnx(model, args, path, config=config, return_selection=True)
    report = verify_onnx(path, ep.module(), args)
    assert report.ok, str(report)
    assert report.selections_equal and report.max_error <= 1e-4


def test_long_selection_uses_the_sort_free_solver(tmp_path: Path) -> None:
    """243 pages of 16 = 3888 selected tokens: too long for TensorRT's TopK, so no sort is emitted.

    (Both α closed forms of the solver are checked against the sort at the op level.)
    """
    model = _decoder(1.5, n_layers=1)
    args = example_inputs(model, batch=1, cache_len=4096)
    path = tmp_path / "long.onnx"
    ep = to_onnx(
        model, args, path, config=EntmaxKVConfig(policy="topk", budget_pages=240), return_selection=True
    )
    report = verify_onnx(path, ep.module(), args)
    assert report.ok, str(report)
    assert report.op_counts["TopK"] == 2  # page ranking and slot packing only


def test_cli_exports_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cli.onnx"
    assert main(["--out", str(path), "--policy", "certified", "--alpha", "2", "--dtype", "float16"]) == 0
    printed = capsys.readouterr().out
    assert path.exists()
    assert "selections identical" in printed and "TensorRT parser  ready" in printed


class _SoftmaxAttention(nn.Module):
    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return torch.softmax(q @ k.transpose(-2, -1) / 8.0, dim=-1) @ v


class _EntmaxAttentionAndHead(nn.Module):
    """Entmax attention, plus an entmax over output logits that is not attention."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        p = torch.ops.entmaxkv.entmax(q @ k.transpose(-2, -1) * 0.125, 1.5, -1)
        return torch.ops.entmaxkv.entmax((p @ v).sum(1), 2.0, -1)


def _qkv(s: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    return torch.randn(1, 2, 1, 64), torch.randn(1, 2, s, 64), torch.randn(1, 2, s, 64)


def test_library_entmax_calls_are_found() -> None:
    """Dynamo capture with the pass's polyfills turns known entmax callables into one op to match."""
    pytest.importorskip("entmaxkv_compile.passes.opaque")
    entmax15 = pytest.importorskip("entmax").entmax15

    class LibraryEntmax(nn.Module):  # the entmax package and our sparsemax; GQA by repeat_interleave
        def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            k4, v4 = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
            a = entmax15(q @ k4.transpose(-2, -1) / 8.0, dim=-1) @ v4
            return a + sparsemax(q @ k4.transpose(-2, -1) / 8.0, dim=-1) @ v4

    q, k, v = _qkv()
    ops = _ops(export_static(LibraryEntmax(), (q.repeat(1, 2, 1, 1), k, v), config=SMALL_TOPK))
    assert ops.count("entmaxkv.static_topk_attn.default") == 2


class _Fp32Values(nn.Module):
    """fp16 q/k/v, but probabilities and values multiplied in fp32 and cast back afterwards."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        p = torch.ops.entmaxkv.entmax((q @ k.transpose(-2, -1)).float() * 0.125, 2.0, -1)
        return (p @ v.float()).half() * 2


def test_site_output_keeps_its_dtype() -> None:
    q, k, v = (x.half() for x in _qkv())
    out = export_static(_Fp32Values(), (q, k, v), config=SMALL_TOPK).module()(q, k, v)
    assert out.dtype == torch.float16 and out.isfinite().all()


def test_non_attention_entmax_stays_dense(caplog: pytest.LogCaptureFixture) -> None:
    ops = _ops(export_static(_EntmaxAttentionAndHead(), _qkv(), config=SMALL_TOPK))
    assert ops.count("entmaxkv.static_topk_attn.default") == 1
    assert ops.count("entmaxkv.entmax.default") == 1
    assert "leaves an entmax dense" in caplog.text


def test_no_entmax_attention_is_an_error() -> None:
    with pytest.raises(ValueError, match="no entmax attention site to make static in _SoftmaxAttention"):
        export_static(_SoftmaxAttention(), _qkv(), config=SMALL_TOPK)


def test_budget_larger_than_the_cache_is_an_error() -> None:
    model = _decoder()
    with pytest.raises(
        ValueError, match=r"attention site entmax: static budget of 19 pages .* cache's 16 pages"
    ):
        export_static(model, example_inputs(model), config=EntmaxKVConfig(policy="topk", budget_pages=16))
    with pytest.raises(ValueError, match=r"certified capacity 256 must be in \[1, cache length 256\)"):
        export_static(model, example_inputs(model), config=EntmaxKVConfig(policy="certified"))


def test_dynamic_shapes_are_refused() -> None:
    model = _decoder()
    batch = torch.export.Dim("batch")
    with pytest.raises(ValueError, match="static graphs only"):
        export_static(model, example_inputs(model), config=SMALL_TOPK, dynamic_shapes={"ids": {0: batch}})


def test_unsupported_policy_and_alpha() -> None:
    with pytest.raises(ValueError, match="'topk' or 'certified', got 'adaptive'"):
        export_static(_EntmaxAttentionAndHead(), _qkv(), config=EntmaxKVConfig(policy="adaptive"))
    model = _decoder(alpha=1.25)
    with pytest.raises(NotImplementedError, match=r"alpha in \(1.5, 2.0\) only, got alpha=1.25"):
        export_static(model, example_inputs(model), config=SMALL_TOPK)


def test_cache_not_in_whole_pages_is_an_error() -> None:
    q, k, v = _qkv(s=250)
    with pytest.raises(ValueError, match="cache length 250 must be a multiple of page_size=16"):
        export_static(_EntmaxAttentionAndHead(), (q, k, v), config=SMALL_TOPK)
