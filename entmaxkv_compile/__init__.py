"""entmaxkv-compile: a torch.compile backend that makes entmax-attention decoding sparse and exact.

``torch.compile(model, backend="entmaxkv")`` works once the package is installed; the names here are
for non-default settings (:func:`backend`, :class:`EntmaxKVConfig`), inspection (:func:`explain`),
state (:func:`reset`) and the static-budget export (:func:`export_static`, :func:`to_onnx`, loaded
lazily so that ``import entmaxkv_compile`` never imports onnx).
"""

from typing import Any

from .backend import backend, register, reset
from .config import EntmaxKVConfig
from .explain import explain

__all__ = ["EntmaxKVConfig", "backend", "explain", "export_static", "register", "reset", "to_onnx"]
__version__ = "0.1.0"

_LAZY = {"export_static", "to_onnx"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import export

        return getattr(export, name)
    raise AttributeError(f"module 'entmaxkv_compile' has no attribute {name!r}")
