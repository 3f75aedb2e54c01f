"""Static-budget export: ``torch.export`` → ONNX (checked with ONNX Runtime) and the TensorRT path.

Needs the ``onnx`` extra (onnx, onnxscript, onnxruntime). See ``docs/EXPORT.md``.
"""

from .static import export_static, to_onnx
from .tensorrt import check_tensorrt_ready, register_torch_tensorrt
from .verify import OnnxReport, verify_onnx

__all__ = [
    "OnnxReport",
    "check_tensorrt_ready",
    "export_static",
    "register_torch_tensorrt",
    "to_onnx",
    "verify_onnx",
]
