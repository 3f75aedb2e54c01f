"""The ``entmaxkv`` torch.compile backend: rewrite entmax decode attention, then hand off.

``torch.compile(model, backend="entmaxkv")`` resolves the name through the ``torch_dynamo_backends``
entry point to :func:`entmaxkv_backend` (this module must therefore never call ``register_backend``
with that name itself: the registry would see it twice).  For non-default settings use the factory,
``torch.compile(model, backend=entmaxkv_compile.backend(EntmaxKVConfig(policy="dense")))``.

Per captured graph (Dynamo IR, real example inputs — never run: the graph writes the KV cache):

* grad enabled (training) → the graph goes to the inner compiler untouched;
* otherwise :func:`entmaxkv_compile.passes.apply` rewrites every entmax decode site into one
  ``entmaxkv::decode_attn`` call (prefill and softmax attention stay as they are), counting in
  ``torch._dynamo.utils.counters["entmaxkv"]`` and logging on the ``entmaxkv_compile`` logger;
* the result goes to ``config.inner_compiler``: Inductor's ``compile_fx`` (``mode`` → Inductor
  options as ``torch.compile`` itself would, remaining ``options`` as Inductor config patches),
  ``aot_eager`` (AOTAutograd with Inductor's decompositions, no codegen: fast CPU tests) or ``eager``.

Options named ``entmaxkv.<field>`` override :class:`~entmaxkv_compile.config.EntmaxKVConfig` fields,
e.g. ``torch.compile(m, backend="entmaxkv", options={"entmaxkv.policy": "dense"})``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch._dynamo.utils import counters

from . import passes
from .config import EntmaxKVConfig

CompiledFn = Callable[..., Any]
_PREFIX = "entmaxkv."


def entmaxkv_backend(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> CompiledFn:
    """The entry-point backend, with the default :class:`EntmaxKVConfig` (plus ``entmaxkv.*`` options)."""
    return _compile(gm, example_inputs, EntmaxKVConfig(), mode, options)


def backend(config: EntmaxKVConfig | None = None, **overrides: Any) -> Callable[..., CompiledFn]:
    """A backend callable for ``torch.compile(..., backend=...)`` with ``config`` (and field overrides)."""
    cfg = (config or EntmaxKVConfig()).replace(**overrides)

    def compiler(
        gm: fx.GraphModule,
        example_inputs: list[Any],
        mode: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> CompiledFn:
        return _compile(gm, example_inputs, cfg, mode, options)

    compiler.config = cfg  # type: ignore[attr-defined]
    return compiler


def register(name: str = "entmaxkv") -> None:
    """Register the backend name without package metadata (no-op if the name is already known)."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if name not in _COMPILER_FNS:
        register_backend(compiler_fn=entmaxkv_backend, name=name)


def reset(model: object | None = None) -> None:
    """Drop the per-site decode state (page metadata, sketches) so the next step starts a new sequence.

    State is keyed by rewritten site, not by model: every site is reset; ``model`` is accepted so call
    sites read naturally (``reset(model)``).
    """
    try:
        from .ops.cuda import reset_all
    except ImportError:  # no GPU state module: the CPU path is stateless
        return
    reset_all()


def _compile(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    config: EntmaxKVConfig,
    mode: str | None,
    options: dict[str, Any] | None,
) -> CompiledFn:
    options = dict(options or {})
    ours = {k[len(_PREFIX) :]: options.pop(k) for k in list(options) if k.startswith(_PREFIX)}
    if ours:
        config = config.replace(**ours)
    if _is_inference(gm):
        counters["entmaxkv"]["graphs"] += 1
        passes.apply(gm, example_inputs, config)
    else:
        counters["entmaxkv"]["grad_graphs"] += 1
    return _inner(config.inner_compiler, gm, example_inputs, mode, options)


def _is_inference(gm: fx.GraphModule) -> bool:
    """Dynamo traced under no_grad/inference_mode and the graph does not turn grad back on."""
    toggles = (torch._C._set_grad_enabled, torch.enable_grad, torch.set_grad_enabled)
    return not torch.is_grad_enabled() and not any(n.target in toggles for n in gm.graph.nodes)


def _inner(
    name: str, gm: fx.GraphModule, example_inputs: list[Any], mode: str | None, options: dict[str, Any]
) -> CompiledFn:
    if name == "eager":
        return gm.forward
    if name == "aot_eager":
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd
        from torch._inductor.decomposition import select_decomp_table

        def nop(g: fx.GraphModule, _: Any) -> CompiledFn:
            return make_boxed_func(g.forward)

        aot = aot_autograd(
            fw_compiler=nop, decompositions=select_decomp_table(), keep_inference_input_mutations=True
        )
        return aot(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = {**(list_mode_options(mode) if mode else {}), **options}
    return compile_fx(gm, example_inputs, config_patches=patches)
