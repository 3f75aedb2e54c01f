"""Tensor-parallel decode: ``examples/tensor_parallel.py`` under ``torchrun`` (2 processes).

CPU (gloo): the head-sharded model compiled with ``backend="entmaxkv"`` greedy-decodes the same tokens as
the unsharded model in one process; on every rank each decode graph has one ``decode_attn`` per layer with
the *local* head counts, and the rewrite adds or removes no distributed node (the collectives are the TP
plan's). The multi-GPU variant (nccl, one GPU per rank) is skipped with fewer than 2 GPUs; run it with
``pytest -m multigpu tests/test_tensor_parallel.py`` on a machine with >= 2 GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
LAYERS, HEADS, KV_HEADS = 2, 8, 4
LINEARS_PER_LAYER = 7  # wq, wk, wv, wo, w1, w3, w2: one from_local/redistribute/to_local each


def run_example(tmp_path: Path, nproc: int, backend: str, timeout: int) -> list[dict]:
    out = tmp_path / "tp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += [str(ROOT / "examples" / "tensor_parallel.py"), "--backend", backend, "--json", str(out)]
    cmd += ["--layers", str(LAYERS), "--heads", str(HEADS), "--kv-heads", str(KV_HEADS)]
    cmd += ["--context", "160", "--max-len", "256"]  # seeded K/V context: each rank fills its own heads
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tokens identical" in proc.stdout, proc.stdout
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(nproc)]


def check(results: list[dict]) -> None:
    nproc = len(results)
    ref = results[0]["reference"]
    assert results[0]["identical"] and len(ref["tokens"]) == 8
    assert ref["rewritten"] == LAYERS
    # the unsharded run sees all heads, the rewrite adds no distributed node there either
    assert [g["decode_heads"] for g in ref["graphs"]] == [[[HEADS, KV_HEADS]] * LAYERS]
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == nproc
        s = res["sharded"]
        assert s["tokens"] == ref["tokens"], r
        assert s["rewritten"] == LAYERS and s["left_dense"] == 0
        (step,) = s["graphs"]  # one decode graph (prefill runs eagerly), compiled once
        assert step["decode_heads"] == [[HEADS // nproc, KV_HEADS // nproc]] * LAYERS
        assert step["dist_after"] == step["dist_before"]
        # the spelling of a node differs between torch versions (a method name, a function's path)
        spelt = sum(n for name, n in step["dist_before"].items() if "redistribute" in name)
        assert spelt == LINEARS_PER_LAYER * LAYERS, step["dist_before"]


def test_two_processes_gloo_match_single_process(tmp_path: Path) -> None:
    check(run_example(tmp_path, 2, "gloo", timeout=240))


@pytest.mark.gpu
@pytest.mark.multigpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs >= 2 CUDA GPUs")
def test_two_gpus_nccl_match_single_gpu(tmp_path: Path) -> None:
    check(run_example(tmp_path, 2, "nccl", timeout=600))
