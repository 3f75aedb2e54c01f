"""The fidelity harness: a short CPU evaluation that must keep its structural guarantees, the extra policy
variants against the reference, and (with committed weights) stored figures of the trained model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.eval.__main__ import parse_args, run
from entmaxkv_compile.eval.policies import _certified, l1_sketch_bound
from entmaxkv_compile.reference.decode import decode_attention
from entmaxkv_compile.reference.sketch import QMAX, build_sketch

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "artifacts/entmax_lm.pt"

# `python -m entmaxkv_compile.eval --smoke --device cpu` on the committed weights (torch 2.13 CPU,
# Python 3.11 stdlib as validation text): (value, absolute tolerance).
EXPECTED: dict[str, tuple[float, float]] = {
    "context_bpb/0/bpb": (1.6592, 5e-3),
    "context_bpb/1/bpb": (1.3095, 5e-3),
    "decode_bpb/policies/dense/bpb": (0.5590, 5e-3),
    "decode_bpb/policies/certified int8 g32 l2 2r/rel_to_dense": (0.0, 1e-6),
    "fidelity/policies/certified int8 g32 l2 2r/overall/kv_bytes_fraction": (0.4767, 5e-3),
    "fidelity/policies/certified int8 g64 l2 2r/overall/kv_bytes_fraction": (0.4614, 5e-3),
    "fidelity/policies/certified int4 g32 l2 2r/overall/kv_bytes_fraction": (0.3519, 5e-3),
    "fidelity/policies/certified int4 g32 l2 2r/overall/output_error_worst": (0.0, 1e-5),
}


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("eval")
    argv = ["--smoke", "--device", "cpu", "--out-dir", str(out)]
    res = run(parse_args(argv if WEIGHTS.exists() else [*argv, "--random-init"]))
    assert (out / "fidelity.json").exists()
    return res


def _policies(result: dict, family: str) -> dict:
    return {n: r for n, r in result["fidelity"]["policies"].items() if r["family"] == family}


def test_certified_policies_are_exact(result: dict) -> None:
    certified = _policies(result, "certified")
    assert len(certified) >= 8
    for name, r in certified.items():
        o = r["overall"]
        assert o["output_error_worst"] <= 1e-5, name
        assert o["support_recall_worst"] == 1.0 and o["dropped_mass_worst"] == 0.0, name
        assert o["delta_bound_worst"] == 0.0 and o["certified"] == 1.0, name


def test_dense_and_bounds_are_consistent(result: dict) -> None:
    pols = result["fidelity"]["policies"]
    assert pols["dense"]["overall"]["output_error_worst"] == 0.0
    for name, r in pols.items():
        o = r["overall"]
        if not math.isnan(o["delta_bound_worst"]):  # a certificate never under-states the dropped mass
            assert o["dropped_mass_worst"] <= o["delta_bound_worst"] + 1e-6, name
        assert 0.0 <= o["support_recall_worst"] <= o["support_recall"] <= 1.0, name


def test_topk_recall_grows_with_budget(result: dict) -> None:
    topk = _policies(result, "topk")
    recalls = [topk[f"topk p16 1/{d}"]["overall"]["support_recall"] for d in (128, 64, 32, 16, 8)]
    assert recalls == sorted(recalls)  # nested selections


def test_exact_policies_decode_like_dense(result: dict) -> None:
    dec = result["decode_bpb"]["policies"]
    for name, r in dec.items():
        if name == "dense" or name.startswith("certified"):
            assert abs(r["rel_to_dense"]) < 1e-5, name
    pk = result["passkey"]["policies"]
    assert pk["certified int8 g32 l2 2r"] == pk["dense"]


def test_custom_certified_matches_reference() -> None:
    torch.manual_seed(0)
    q = 3 * torch.randn(2, 8, 1, 64)
    k = (torch.randn(2, 2, 300, 64) + torch.randn(2, 2, 1, 64)).bfloat16()
    v = torch.randn(2, 2, 300, 64).bfloat16()
    cfg = EntmaxKVConfig(
        policy="certified", sketch="int4", sketch_group=16, sketch_rotation=False, candidate_fraction=1.0
    )
    ref_out, ref = decode_attention(q, k, v, scale=0.125, alpha=1.5, config=cfg)
    out, st = _certified(4, 16, "l2", 2, cfg.min_candidates)(q, k, v, 0.125, None)
    assert torch.equal(st.selected, ref.selected)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(st.kv_bytes_fraction, ref.kv_bytes_fraction.float())


@pytest.mark.parametrize("bits", [8, 4])
def test_l1_sketch_bound_holds(bits: int) -> None:
    torch.manual_seed(bits)
    q = torch.randn(1, 8, 1, 64) * torch.logspace(-2, 2, 64)
    k = (torch.randn(1, 2, 500, 64) * torch.logspace(2, -2, 64)).bfloat16()
    sketch = build_sketch(k, bits, 16)
    gqa = [0, 0, 0, 0, 1, 1, 1, 1]
    resid = k.double() - sketch.k_hat.double()
    exact = 0.125 * (q.double() @ resid[:, gqa].transpose(-1, -2))  # s − ŝ in exact arithmetic
    bound = l1_sketch_bound(q, sketch.scales, QMAX[bits], 0.125)
    assert (exact.abs() <= bound).all()


@pytest.mark.skipif(not WEIGHTS.exists() or not EXPECTED, reason="needs the committed weights and figures")
def test_stored_figures(result: dict) -> None:
    for key, (value, tol) in EXPECTED.items():
        section, *path = key.split("/")
        got = result[section]
        for part in path:
            got = got[int(part)] if isinstance(got, list) else got[part]
        assert abs(got - value) <= tol, f"{key}: {got} vs stored {value} ± {tol}"
