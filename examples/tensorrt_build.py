"""Build the static-budget decoder with TensorRT and compare it with the PyTorch reference (needs TensorRT).

NEVER RUN BY THIS PROJECT: TensorRT cannot be installed on its machines. What was checked here is the
ONNX file (``check_tensorrt_ready``: TensorRT 10.x parser's operator table, constant inputs, static
shapes) and ONNX Runtime on CPU. Run this on a CUDA machine with TensorRT ≥ 10 (and, for the second
path, Torch-TensorRT) and report what you see.

    python examples/tensorrt_build.py onnx              # TensorRT Python API: parse, build, run, compare
    python examples/tensorrt_build.py torch-tensorrt    # Torch-TensorRT straight from the ExportedProgram
    trtexec --onnx=entmax_decoder_static.onnx --saveEngine=entmax_decoder_static.plan   # NVIDIA's CLI
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import torch

from entmaxkv_compile.config import EntmaxKVConfig
from entmaxkv_compile.export import check_tensorrt_ready, export_static, register_torch_tensorrt, to_onnx
from entmaxkv_compile.export.example import TinyEntmaxDecoder, example_inputs

CONFIG = EntmaxKVConfig(policy="certified", min_candidates=48, candidate_fraction=0.05)


def run_tensorrt(path: str, args: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Parse ``path`` with TensorRT's ONNX parser, build an engine, run it once on ``args`` (CUDA)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(path):
        raise RuntimeError("\n".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    graph = onnx.load(path, load_external_data=False).graph
    tensors = {i.name: x.cuda().contiguous() for i, x in zip(graph.input, args)}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
            dtype = torch.from_numpy(np.empty(0, trt.nptype(engine.get_tensor_dtype(name)))).dtype
            tensors[name] = torch.empty(tuple(engine.get_tensor_shape(name)), dtype=dtype, device="cuda")
        context.set_tensor_address(name, tensors[name].data_ptr())
    stream = torch.cuda.Stream()
    context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    return [tensors[o.name].cpu() for o in graph.output]


def run_torch_tensorrt(model: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Torch-TensorRT on the static ExportedProgram; the static ops lower into ATen ops TensorRT converts."""
    import torch_tensorrt

    if not register_torch_tensorrt():
        raise RuntimeError("torch_tensorrt did not import")
    cuda_args = tuple(a.cuda() for a in args)
    ep = export_static(model.cuda(), cuda_args, config=CONFIG, return_selection=True)
    compiled = torch_tensorrt.dynamo.compile(
        ep, arg_inputs=list(cuda_args), min_block_size=1, require_full_compilation=True
    )
    return [t.cpu() for t in torch.utils._pytree.tree_leaves(compiled(*cuda_args))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("path", choices=("onnx", "torch-tensorrt"))
    p.add_argument("--out", default="entmax_decoder_static.onnx")
    a = p.parse_args()
    torch.manual_seed(0)
    model = TinyEntmaxDecoder(alpha=2.0).eval()
    args = example_inputs(model, batch=2, cache_len=512)
    ep = to_onnx(model, args, a.out, config=CONFIG, return_selection=True)
    print("TensorRT readiness:", check_tensorrt_ready(a.out) or "no problems found")
    with torch.no_grad():
        expected = torch.utils._pytree.tree_leaves(ep.module()(*args))
        got = run_tensorrt(a.out, args) if a.path == "onnx" else run_torch_tensorrt(model, args)
    for i, (g, e) in enumerate(zip(got, expected)):
        if e.is_floating_point():
            err = (g.float() - e.float()).abs().max().item()
            print(f"output {i}: max |TensorRT − reference| = {err:.2e}")
            continue
        if e.dtype == torch.bool:  # certified flags compare exactly, id slots as sets
            same = torch.equal(g.bool(), e)
        else:
            same = torch.equal(g.long().sort(-1).values, e.sort(-1).values)
        print(f"output {i}: {'equal' if same else 'DIFFER'} to the reference")


if __name__ == "__main__":
    main()
