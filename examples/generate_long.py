"""Long-context greedy generation: a Hugging Face Llama with entmax attention, ``backend="entmaxkv"``.

The model is an ordinary ``LlamaForCausalLM`` (random init; ``--preset tiny`` for CPU, ``1b`` for a
Llama-3.2-1B-shaped model, ``attn128`` for D=128 attention with few layers) with
``attn_implementation="entmax15"`` — registered by ``entmaxkv_compile.hf``. The prompt is prefilled
exactly by a chunked dense entmax (query chunks × all keys so far, causal) into a ``StaticCache``; the
decode steps go through ``torch.compile(model, backend="entmaxkv")`` (certified policy: exact), with CUDA
graphs on a GPU where they work. The same steps are decoded densely from the same cache and the greedy
tokens are compared. The default dense decode, ``reference``, computes what the decode op computes (fp32
scores of the cached operands; ``generate.reference_entmax_attention``); ``eager``/``inductor`` run the
model as written, which in bf16 rounds every score to bf16 first, so near-tied tokens may part there.

    python examples/generate_long.py --preset tiny --context 512 --steps 16          # CPU, ~20 s
    python examples/generate_long.py --preset 1b --context 32768 --steps 64          # one GPU
"""

from __future__ import annotations

import argparse
import time

import torch

import entmaxkv_compile
from entmaxkv_compile import generate


def compiled_decoder(model: torch.nn.Module, config: entmaxkv_compile.EntmaxKVConfig, cudagraphs: bool):
    """``torch.compile(model, backend="entmaxkv")``; CUDA graphs (``reduce-overhead``) on request."""
    mode = "reduce-overhead" if cudagraphs else None
    return torch.compile(model, backend=entmaxkv_compile.backend(config), mode=mode)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny", choices=sorted(generate.PRESETS))
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--context", type=int, default=512, help="prompt length (cache tokens before decoding)")
    ap.add_argument("--prefill-len", type=int, default=None, help="exact prefill tokens; the rest repeated")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--policy", default="certified")
    ap.add_argument("--dense", default="reference", choices=["reference", "eager", "inductor"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    args = ap.parse_args()
    on_gpu = args.device != "cpu"
    dtype = getattr(torch, args.dtype or ("bfloat16" if on_gpu else "float32"))
    inner = "inductor" if on_gpu else "aot_eager"  # Inductor's C++ codegen is slow to compile on CPU

    model = generate.build_model(
        args.preset, layers=args.layers, max_positions=args.context + args.steps + 1, device=args.device,
        dtype=dtype,
    )  # fmt: skip
    cache = generate.new_cache(model, args.context + args.steps + 1)
    real = min(args.context, args.prefill_len or args.context)
    ids = torch.randint(0, model.config.vocab_size, (1, real), generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    logits = generate.prefill(model, ids.to(args.device), cache, generate.prefill_chunk(model, real))
    generate.extend_cache(cache, real, args.context)
    elapsed = time.perf_counter() - t0
    print(f"prefill: {real} tokens (exact chunked entmax) in {elapsed:.1f}s; cache {args.context} tokens")
    start = generate.snapshot(cache)

    config = entmaxkv_compile.EntmaxKVConfig(policy=args.policy, inner_compiler=inner)
    try:
        decoder = compiled_decoder(model, config, cudagraphs=on_gpu)
        tokens, times = generate.greedy(decoder, logits, cache, args.steps)
        graphs = on_gpu
    except Exception as e:  # noqa: BLE001  (CUDA graphs are an optimisation; decode without them)
        print(f"CUDA graphs failed ({type(e).__name__}: {e}); decoding without them")
        torch._dynamo.reset()
        generate.restore(cache, start)
        tokens, times = generate.greedy(compiled_decoder(model, config, False), logits, cache, args.steps)
        graphs = False
    rewrites = torch._dynamo.utils.counters["entmaxkv"]["decode_attn"]

    generate.restore(cache, start)
    dense = torch.compile(model) if args.dense == "inductor" else model
    attn = "entmax15" + (generate.REFERENCE_SUFFIX if args.dense == "reference" else "")
    margins: list[float] = []
    with generate.attention(model, attn):
        ref_tokens, _ = generate.greedy(dense, logits, cache, args.steps, margins=margins)

    steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    print(f"entmaxkv: {rewrites} attention sites rewritten, policy={args.policy}, CUDA graphs={graphs}")
    print(
        f"first step (compile) {times[0]:.1f}s, then {1e3 * steady:.2f} ms/token ({1 / steady:.1f} tokens/s)"
    )
    print(f"tokens ({args.policy}): {tokens}")
    print(f"tokens (dense {args.dense}): {ref_tokens}")
    print(f"greedy tokens equal dense: {tokens == ref_tokens}")
    if (div := generate.first_divergence(tokens, ref_tokens, margins)) is not None:
        print(f"first different token: {div['token']}; dense top-2 margin there: {div['margin_ulps']} ulp")
    if rewrites == 0 or tokens != ref_tokens:
        raise SystemExit("MISMATCH: the entmaxkv decode does not reproduce dense greedy decoding")


if __name__ == "__main__":
    main()
