"""Compile counters for the recompile tests: Dynamo's, and the Triton JIT's for the project's kernels.

Triton compiles a ``@triton.jit`` kernel once per *specialisation* (constexpr values, argument dtypes,
integers equal to 1 or divisible by 16, 16-byte pointer alignment) and keeps it in the kernel's in-memory
cache. Triton 3.6 (the GPU image) and 3.9 (CI) both hold that cache in ``JITFunction.device_caches``:
device → ``(kernel_cache, key_cache, target, backend, binder)`` (``create_binder`` in
``triton/runtime/jit.py``), so the entries of the kernel caches count the compilations in this process
(on-disk cache hits included: each is still a new specialisation). Other layouts fail loudly.

Under ``TRITON_INTERPRET=1`` ``@triton.jit`` gives interpreted functions that compile and cache nothing;
:func:`triton_compiles` then raises instead of returning zeros (CPU tests count Dynamo only).
"""

from __future__ import annotations

import sys

from torch._dynamo.utils import counters

KERNELS = "entmaxkv_compile.kernels"
# Dynamo counters that move only when a frame is traced and compiled (again)
DYNAMO_KEYS = (("frames", "total"), ("frames", "ok"), ("stats", "unique_graphs"), ("entmaxkv", "graphs"))


def dynamo_compiles() -> dict[str, int]:
    """Dynamo's compile counters (``frames``, ``unique_graphs``, graphs handed to the entmaxkv backend)."""
    return {f"{group}.{name}": counters[group][name] for group, name in DYNAMO_KEYS}


def triton_compiles() -> dict[str, int]:
    """Compiled specialisations of each ``@triton.jit`` function of ``entmaxkv_compile.kernels``, over all
    devices (``"score.score_kernel": 3``; device helpers inlined into kernels stay at 0)."""
    from triton.runtime.jit import JITFunction, KernelInterface

    import entmaxkv_compile.kernels.launch  # noqa: F401  (imports every kernel module)

    mods = [m for n, m in list(sys.modules.items()) if n.startswith(KERNELS + ".")]
    fns = {id(o): o for m in mods for o in vars(m).values() if isinstance(o, KernelInterface)}
    if not fns:
        raise RuntimeError(f"no @triton.jit functions found in {KERNELS}")
    if not all(isinstance(f, JITFunction) for f in fns.values()):
        raise RuntimeError(
            "Triton kernels run in the interpreter (TRITON_INTERPRET=1), which compiles and caches nothing: "
            "there are no compilations to count"
        )
    return {f"{f.fn.__module__.rsplit('.', 1)[-1]}.{f.fn.__name__}": specialisations(f) for f in fns.values()}


def specialisations(fn: object) -> int:
    """Compiled specialisations in one ``JITFunction``'s kernel caches, over all devices."""
    import triton

    caches = getattr(fn, "device_caches", None)
    if not isinstance(caches, dict) or not all(
        isinstance(c, tuple) and c and isinstance(c[0], dict) for c in caches.values()
    ):
        raise RuntimeError(
            f"triton {triton.__version__}: JITFunction.device_caches is not "
            "{device: (kernel_cache, ...)}; teach tests/compile_counts.py this version's layout"
        )
    return sum(len(c[0]) for c in caches.values())
