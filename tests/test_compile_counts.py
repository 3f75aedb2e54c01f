"""The Triton compile counter of ``tests/compile_counts.py`` on CPU (``tests/gpu/test_gpu_recompiles.py``
uses it on the GPU), and the launch pipelines' specialisations over growing lengths.

No GPU is needed to see Triton compile: a stand-in driver that only names a target (sm_90) lets
``JITFunction.run`` compile for it (ptxas ships with triton) when told not to launch (``warmup``). The
counter must move exactly when Triton compiles a new specialisation; and the real pipelines of
``kernels/launch.py``, compiled that way (nothing runs: outputs are garbage, the launch arguments are real),
must compile nothing new after their first step while the valid length grows 33 → 2,080 across page
boundaries. One fresh interpreter without ``TRITON_INTERPRET`` (read when kernels are defined;
tests/conftest.py sets it on machines without CUDA) runs both.
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
LENGTHS = [33, 48, 49, 256, 257, 2080]  # page boundaries (16) and the full cache of 2,080

PROBE = """
import json
import math
import sys

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.kernels.launch import Scratch, SiteBuffers, decode, make_plan
from tests.compile_counts import specialisations, triton_compiles


class StandIn:  # all JITFunction.run asks of a driver before launching: compile for sm_90
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@triton.jit
def add_one(x_ptr, n, B: tl.constexpr):
    i = tl.arange(0, B)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1, mask=i < n)


driver.set_active(StandIn())
run = JITFunction.run
JITFunction.run = lambda self, *a, grid, warmup, **kw: run(self, *a, grid=grid, warmup=True, **kw)
x = torch.zeros(64)
toy = [specialisations(add_one)]
# plain ints 5, 9, 7 share one specialisation; 16 (divisible by 16), 1, another B, a misaligned pointer do not
for ptr, n, b in ((x, 5, 64), (x, 9, 64), (x, 7, 64), (x, 16, 64), (x, 1, 64), (x, 5, 32), (x[1:], 5, 64)):
    add_one.warmup(ptr, n, B=b, grid=(1,))
    toy.append(specialisations(add_one))

fresh = triton_compiles()
b, hq, hkv, s, d, cpu = 2, 8, 2, 2080, 64, torch.device("cpu")
pipelines = {}
for policy in ("certified", "topk", "adaptive"):
    cfg = EntmaxKVConfig(policy=policy, budget_pages=8)
    plan = make_plan((b, hq, 1, d), (b, hkv, s, d), d, cfg, 396)
    scratch, site = Scratch(plan, cpu), SiteBuffers(plan, cpu, torch.bfloat16)
    k, v = torch.randn(2, b, hkv, s, d, dtype=torch.bfloat16)
    pipelines[policy] = []
    for n in json.loads(sys.argv[1]):
        q = torch.randn(b, hq, 1, d, dtype=torch.bfloat16)
        bias = torch.zeros(1, 1, 1, s).masked_fill(torch.arange(s) >= n, -math.inf)
        decode(plan, scratch, site, q, k, v, bias, d**-0.5, 1.5, cfg)
        pipelines[policy].append(triton_compiles())
print(json.dumps({"toy": toy, "fresh": fresh, "pipelines": pipelines}))
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    script = tmp_path_factory.mktemp("probe") / "probe.py"  # a file: @triton.jit reads the kernel's source
    script.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, str(script), json.dumps(LENGTHS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_triton_compiles_counts_new_specialisations_only(probe: dict) -> None:
    assert probe["toy"] == [0, 1, 1, 1, 2, 3, 4, 5]
    launched = ("meta.update_kernel", "score.score_kernel", "score.cand_kernel", "solve.solve_kernel")
    launched += ("output.output_kernel", "pages.page_score_kernel", "pages.select_hist_kernel")
    launched += ("pages.select_take_kernel", "pages.page_gather_kernel", "pages.page_tau_kernel")
    launched += ("pages.page_pass_kernel",)
    assert set(launched) <= set(probe["fresh"])  # every kernel launch.py launches is counted …
    assert set(probe["fresh"].values()) == {0}  # … and none compiled yet in a fresh process


@pytest.mark.parametrize("policy", ["certified", "topk", "adaptive"])
def test_pipelines_compile_nothing_new_as_the_length_grows(probe: dict, policy: str) -> None:
    first, *rest = probe["pipelines"][policy]
    launched = [name for name, n in first.items() if n > 0]
    assert "solve.solve_kernel" in launched and "output.output_kernel" in launched
    assert ("score.cand_kernel" if policy == "certified" else "pages.select_take_kernel") in launched
    for n, counts in zip(LENGTHS[1:], rest):
        assert counts == first, f"length {n}: new Triton specialisations"


@pytest.mark.skipif(torch.cuda.is_available(), reason="kernels run compiled, not interpreted, with CUDA")
def test_triton_compiles_refuses_the_interpreter() -> None:
    from tests.compile_counts import triton_compiles

    with pytest.raises(RuntimeError, match="interpreter"):
        triton_compiles()
