import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter on CPU tensors (tests/test_kernels_interp.py).
# It must be chosen before any kernel module is imported, which other test modules may do first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch._dynamo.utils import counters  # noqa: E402  (imports triton: after the choice above)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run `pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fresh_dynamo():
    """A clean Dynamo cache and counters around a test (modules opt in with ``usefixtures``)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def pytest_terminal_summary(terminalreporter):
    """Counts of the fuzzed graph zoo (tests/test_fuzz_zoo.py), printed whenever it ran."""
    import sys

    fuzz = next((m for n, m in list(sys.modules.items()) if n.endswith("test_fuzz_zoo")), None)
    if fuzz is None or not fuzz.COUNTS["variants"]:
        return
    c = fuzz.COUNTS
    terminalreporter.write_sep("-", "entmaxkv fuzzed graph zoo")
    terminalreporter.write_line(
        f"variants generated: {c['variants']}, rewritten: {c['rewritten']}, left alone: {c['left alone']} "
        f"(of which accepted misses on a one-token cache: {c['missed (accepted: one-token cache)']}), "
        f"mismatches: {c['mismatches']}, wrong rewrite decisions: {c['wrong rewrite decisions']}"
    )
