"""TensorRT readiness of an exported ONNX file, and the Torch-TensorRT hook for the static ops.

TensorRT cannot be installed on this project's machines, so nothing here has met a TensorRT build.
:func:`check_tensorrt_ready` checks an ONNX file against what TensorRT's ONNX parser documents
(``docs/operators.md`` of TensorRT 10.15: opsets 9–24, the supported-operator table and its
restrictions) and against what a static graph must not contain. :func:`register_torch_tensorrt` teaches
Torch-TensorRT to lower the static ops into the ATen ops its converters cover.
"""

from __future__ import annotations

from os import PathLike

import onnx

from ..ops.static import STATIC_DECOMPOSITIONS, TOPK_LIMIT

OPSET_RANGE = (9, 24)
# ONNX operators TensorRT 10.15's parser supports ("Y" rows of its operators.md)
_PARSER_TABLE = """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
    CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
    Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
    Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
    LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike
    Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
    ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign
    RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid
    Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
    TensorScatter ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor"""
TENSORRT_OPS = frozenset(_PARSER_TABLE.split())
# parsed by TensorRT, but control flow or data-dependent shapes have no place in a static-budget graph
NOT_STATIC = frozenset({"If", "Loop", "Scan", "NonZero", "NonMaxSuppression", "Unique"})
# inputs TensorRT needs as build-time constants: (op type or prefix, input index, name)
CONSTANT_INPUTS = (
    ("TopK", 1, "K"),
    ("CumSum", 1, "axis"),
    ("Reduce", 1, "axes"),
    ("Squeeze", 1, "axes"),
    ("Unsqueeze", 1, "axes"),
)


def static_shape_problems(model: onnx.ModelProto) -> list[str]:
    """Strict shape inference; one line per graph input, output or value whose shape is not fully static."""
    try:
        g = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True).graph
    except onnx.shape_inference.InferenceError as err:
        return [f"shape inference failed: {err}"]
    problems = []
    for info in [*g.input, *g.output, *g.value_info]:
        t = info.type.tensor_type
        if not t.HasField("shape"):
            problems.append(f"value {info.name!r}: no inferred shape")
        elif not all(d.HasField("dim_value") for d in t.shape.dim):
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in t.shape.dim]
            problems.append(f"value {info.name!r}: dynamic shape {dims}")
    return problems


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    consts = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = node.attribute[0].t
    return consts


def _node_problems(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> list[str]:
    where = f"node {node.name or node.output[0]!r} ({node.op_type})"
    if node.domain not in ("", "ai.onnx"):
        return [f"{where}: custom domain {node.domain!r} needs a TensorRT plugin"]
    if node.op_type in NOT_STATIC:
        return [f"{where}: control flow / data-dependent shape in a static graph"]
    if node.op_type not in TENSORRT_OPS:
        return [f"{where}: not supported by TensorRT's ONNX parser"]
    problems = []
    for op, index, name in CONSTANT_INPUTS:
        given = len(node.input) > index and node.input[index]
        if node.op_type.startswith(op) and given and node.input[index] not in consts:
            problems.append(f"{where}: input {name} must be a build-time constant")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "TopK":
        if attrs.get("sorted", 1) != 1:
            problems.append(f"{where}: sorted must be 1")
        if node.input[1] in consts:
            k = int(onnx.numpy_helper.to_array(consts[node.input[1]]).reshape(-1)[0])
            if k >= TOPK_LIMIT:
                problems.append(f"{where}: K={k} must be less than {TOPK_LIMIT}")
    if node.op_type == "ScatterND" and attrs.get("reduction", b"none") != b"none":
        problems.append(f"{where}: only reduction 'none' is supported")
    return problems


def check_tensorrt_ready(onnx_path: str | PathLike[str]) -> list[str]:
    """What would stop TensorRT's ONNX parser (10.x) from building ``onnx_path``; empty when ready.

    Checks the opset, every node against the parser's operator table, the inputs it needs as constants
    (TopK's K, CumSum's axis, Reduce*/Squeeze/Unsqueeze axes), TopK ``K < 3840`` and ``sorted=1``, no
    control flow or data-dependent ops (If, Loop, Scan, NonZero, NonMaxSuppression, Unique), and fully
    static shapes.
    """
    model = onnx.load(str(onnx_path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    problems = []
    if opset is None or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        problems.append(f"opset {opset}: TensorRT parses opsets {OPSET_RANGE[0]}–{OPSET_RANGE[1]}")
    consts = _constants(model.graph)
    for node in model.graph.node:
        problems += _node_problems(node, consts)
    return problems + static_shape_problems(model)


def register_torch_tensorrt() -> bool:
    """Register the static ops' decompositions with Torch-TensorRT's lowering; ``False`` without it.

    Torch-TensorRT then lowers every ``entmaxkv::static_*`` node into ATen ops (topk, gather, cumsum, …)
    that its own converters build, instead of leaving it to PyTorch behind a graph break. Never run here:
    ``torch_tensorrt`` needs a CUDA build of torch and TensorRT's libraries.
    """
    try:
        from torch_tensorrt.dynamo.lowering._decomposition_groups import TORCH_TRT_DECOMPOSITIONS
        from torch_tensorrt.dynamo.lowering._decompositions import register_torch_trt_decomposition
    except (ImportError, OSError):
        return False
    for op, fn in STATIC_DECOMPOSITIONS.items():
        if op not in TORCH_TRT_DECOMPOSITIONS:
            register_torch_trt_decomposition(op, registry=TORCH_TRT_DECOMPOSITIONS)(fn)
    return True
