"""The Triton compile counter of ``tests/compile_counts.py`` on CPU (``tests/gpu/test_gpu_recompiles.py``
uses it on the GPU).

No GPU is needed to see Triton compile: a stand-in driver that only names a target (sm_90) lets
``JITFunction.warmup`` compile a toy kernel (ptxas ships with triton) without launching it. The counter must
move exactly when Triton compiles a new specialisation. That runs in a fresh interpreter without
``TRITON_INTERPRET`` (read when kernels are defined; tests/conftest.py sets it on machines without CUDA).
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

COMPILE_TOY = """
import json

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from tests.compile_counts import specialisations, triton_compiles


class StandIn:  # all JITFunction.run(warmup=True) asks of a driver: compile for sm_90, launch nothing
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
x = torch.zeros(64)
counts = [specialisations(add_one)]
# plain ints 5, 9, 7 share one specialisation; 16 (divisible by 16), 1, another B, a misaligned pointer do not
for ptr, n, b in ((x, 5, 64), (x, 9, 64), (x, 7, 64), (x, 16, 64), (x, 1, 64), (x, 5, 32), (x[1:], 5, 64)):
    add_one.warmup(ptr, n, B=b, grid=(1,))
    counts.append(specialisations(add_one))
print(json.dumps({"counts": counts, "kernels": triton_compiles()}))
"""


def test_triton_compiles_counts_new_specialisations_only(tmp_path: Path) -> None:
    script = tmp_path / "compile_toy.py"  # a file: @triton.jit reads the kernel's source
    script.write_text(COMPILE_TOY)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["counts"] == [0, 1, 1, 1, 2, 3, 4, 5]
    launched = ("meta.update_kernel", "score.score_kernel", "score.cand_kernel", "solve.solve_kernel")
    launched += ("output.output_kernel", "pages.page_score_kernel", "pages.select_hist_kernel")
    launched += ("pages.select_take_kernel", "pages.page_gather_kernel")
    assert set(launched) <= set(got["kernels"])  # every kernel launch.py launches is counted …
    assert set(got["kernels"].values()) == {0}  # … and none compiled yet in a fresh process


@pytest.mark.skipif(torch.cuda.is_available(), reason="kernels run compiled, not interpreted, with CUDA")
def test_triton_compiles_refuses_the_interpreter() -> None:
    from tests.compile_counts import triton_compiles

    with pytest.raises(RuntimeError, match="interpreter"):
        triton_compiles()
