"""``kernels``: one decode step of one layer, every policy side by side with SDPA, on a CUDA GPU.

For each shape and context: ``torch.nn.functional.scaled_dot_product_attention`` (dense softmax,
``enable_gqa``, no mask: its fastest path), the exact dense entmax decode, the default policy ``auto`` (dense
or certified by the cache length), ``certified`` with int8 and int4
sketches at controlled candidate fractions, static ``topk`` at 1/n of the pages (``--topk``) and ``adaptive``
capped at 1/n of the pages (``--adaptive``; its τ estimate keeps nearly every page on this data, where page
boxes of N(0, 1) keys are wide, so it times the estimate's cost on top of top-k). Each
variant is captured in a CUDA graph; the time is the median over ``--reps`` replays (CUDA events, L2 flushed
before each) after warm-up; the eager median (with Python launch overhead) is reported too. Bytes read count
KV rows, metadata (sketch or page boxes) and the mask; bandwidth is compared with a device-to-device copy
measured in the same run (bytes read + written).

Data (α = 1.5, ``scale = 1/√D``): per KV group a unit direction ``u``; every query of the group is
``√D·u`` (+1% noise); background keys are N(0, 1) (scores ≈ N(0, 1)); 32 *support* keys per group score
12 (z = 6, τ ≈ 5.82); ``fraction·S − 32`` *decoy* keys score 11.54 (z = 5.77, just outside the support)
plus a large component orthogonal to ``u`` (‖·‖ ≈ 3√D) that makes their sketches coarse. Sketch bounds
cannot exclude decoys but exclude the background, so candidates ≈ ``fraction·S`` for either sketch.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

SHAPES = {
    "standard": dict(b=1, hq=32, hkv=8, d=128, dtype="bfloat16"),
    "b8": dict(b=8, hq=32, hkv=8, d=128, dtype="bfloat16"),
    "mha": dict(b=1, hq=8, hkv=8, d=128, dtype="float16"),
}
ALPHA = 1.5
N_SUPPORT = 32
SUPPORT_SCORE = 12.0
DECOY_SCORE = 11.54
VARIANT_SITES = {
    ("dense", "int8"): 0,
    ("certified", "int8"): 1,
    ("certified", "int4"): 2,
    ("topk", "int8"): 3,
    ("auto", "int8"): 4,
    ("adaptive", "int8"): 5,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="folder for kernels.json and kernels.png")
    p.add_argument("--shapes", default="standard,b8,mha", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--contexts", default="32768,131072,524288,1048576", help="comma list of cache lengths")
    p.add_argument("--fractions", default="0.002,0.015,0.07", help="certified candidate fractions")
    p.add_argument("--sketches", default="int8,int4")
    p.add_argument(
        "--sketch-groups",
        default="default",
        help="comma list of sketch channel-group sizes (one step per group; 'default': the config's)",
    )
    p.add_argument(
        "--rotations",
        default="default",
        help="comma list of sketch rotations: on, off or 'default' (the config's: on for int4)",
    )
    p.add_argument("--topk", default="64", help="comma list of n: top-k budgets of 1/n of the pages")
    p.add_argument("--adaptive", default="64", help="comma list of n: adaptive capped at 1/n of the pages")
    p.add_argument("--reps", type=int, default=50, help="timed replays per variant (median)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--profile", action="store_true", help="also record per-kernel device times (torch.profiler)"
    )


def planted(
    shape: dict, s: int, fractions: list[float], seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, list]:
    """Queries, keys, values and, per fraction (ascending), the decoy positions to plant before running."""
    b, hq, hkv, d = shape["b"], shape["hq"], shape["hkv"], shape["d"]
    dtype, dev = getattr(torch, shape["dtype"]), torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(seed)
    u = F.normalize(torch.randn(b, hkv, 1, d, device=dev, generator=gen), dim=-1)
    noise = torch.randn(b, hq, 1, d, device=dev, generator=gen)
    q = (math.sqrt(d) * u.repeat_interleave(hq // hkv, dim=1) + 0.01 * noise).to(dtype)
    k = torch.randn(b, hkv, s, d, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(b, hkv, s, d, device=dev, dtype=dtype, generator=gen)
    order = torch.rand(b, hkv, s, device=dev, generator=gen).argsort(-1)
    rows = torch.arange(b * hkv, device=dev)[:, None]
    sup = order[..., :N_SUPPORT].reshape(b * hkv, -1)
    k.view(b * hkv, s, d)[rows, sup] = (SUPPORT_SCORE * u.reshape(b * hkv, 1, d)).to(dtype)
    plants, done = [], N_SUPPORT
    for f in fractions:
        n = max(done, round(f * s))
        pos = order[..., done:n].reshape(b * hkv, -1)
        w = 3.0 * torch.randn(b * hkv, pos.shape[1], d, device=dev, generator=gen)
        w -= (w * u.reshape(b * hkv, 1, d)).sum(-1, keepdim=True) * u.reshape(b * hkv, 1, d)
        plants.append((rows, pos, (DECOY_SCORE * u.reshape(b * hkv, 1, d) + w).to(dtype)))
        done = n
    return q, k, v, plants


def copy_bandwidth(reps: int = 20) -> float:
    """Device-to-device copy rate in TB/s, counting bytes read plus bytes written."""
    src = torch.empty(2**31, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _time(lambda: dst.copy_(src), reps, 3, flush=None)
    return 2 * src.numel() / (ms * 1e-3) / 1e12


def _time(fn, reps: int, warmup: int, flush: Tensor | None) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        e.record()
        e.synchronize()
        times.append(a.elapsed_time(e))
    return sorted(times)[len(times) // 2]


def _kernel_times(fn, calls: int = 5) -> dict[str, float]:
    """Mean device time per call of each kernel ``fn`` launches, in µs (without programmatic dependent
    launch: a kernel launched early would count its wait for the previous one as its own time)."""
    from torch.profiler import ProfilerActivity, profile

    from ..kernels import launch

    pdl, launch.PDL = launch.PDL, False
    try:
        fn()  # compiles the kernels without PDL outside the profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
    finally:
        launch.PDL = pdl
    return {e.key: e.device_time_total / calls for e in prof.key_averages() if e.device_time_total > 0}


def _graph(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def run(args: argparse.Namespace) -> None:
    """Time the decode kernels against SDPA on this CUDA GPU; write JSON and a plot."""
    from tqdm import tqdm

    from ..ops import cuda as ops_cuda

    if not torch.cuda.is_available():
        sys.exit("the kernels benchmark needs a CUDA GPU")
    shapes = args.shapes.split(",")
    contexts = [int(c) for c in args.contexts.split(",")]
    fractions = sorted(float(f) for f in args.fractions.split(","))
    sketches = args.sketches.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    bw = copy_bandwidth()
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    records: list[dict] = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    result = dict(
        command="python -m entmaxkv_compile.bench " + " ".join(sys.argv[1:]),
        device=torch.cuda.get_device_name(0),
        torch=torch.__version__,
        triton=__import__("triton").__version__,
        host=platform.node(),
        time=time.strftime("%Y-%m-%d %H:%M:%S"),
        copy_TBps=bw,
        alpha=ALPHA,
        records=records,
    )
    for shape_name, s in tqdm([(sh, s) for sh in shapes for s in contexts], desc="kernels"):
        case = (SHAPES[shape_name], shape_name, s, fractions, sketches)
        records += _bench_case(*case, args, bw, flush, ops_cuda.PROGRAMS_PER_SM * sms)
        ops_cuda._sites.clear()
        ops_cuda._scratch.clear()
        torch.cuda.empty_cache()
        (args.out / "kernels.json").write_text(json.dumps(result, indent=1))
    _plot(records, args.out / "kernels.png", shapes, fractions[0])
    _table(records, bw)


def _bench_case(
    shape: dict,
    shape_name: str,
    s: int,
    fractions: list[float],
    sketches: list[str],
    args: argparse.Namespace,
    bw: float,
    flush: Tensor,
    n_programs: int,
) -> list[dict]:
    """Every variant on one shape and context (the data planted for each candidate fraction in turn)."""
    from tqdm import tqdm

    from ..config import EntmaxKVConfig
    from ..kernels.launch import make_plan
    from ..ops import cuda as ops_cuda

    records: list[dict] = []
    topk_divs = [int(x) for x in args.topk.split(",") if x]
    adaptive_divs = [int(x) for x in args.adaptive.split(",") if x]
    groups = [None if x == "default" else int(x) for x in args.sketch_groups.split(",")]
    rotations = [{"default": None, "on": True, "off": False}[x] for x in args.rotations.split(",")]
    b, hq, hkv, d = shape["b"], shape["hq"], shape["hkv"], shape["d"]
    q, k, v, plants = planted(shape, s, fractions)
    bias = torch.zeros(b, 1, 1, s, device="cuda")
    scale, esize = d**-0.5, k.element_size()
    kv_bytes = 2 * b * hkv * s * d * esize
    base = dict(shape=shape_name, context=s, **shape)

    def record(
        variant: str, fn, nbytes: float, out: Tensor | None = None, ref: Tensor | None = None, **extra
    ):
        ms = _time(_graph(fn), args.reps, args.warmup, flush)
        ms_eager = _time(fn, max(5, args.reps // 5), 2, flush)
        rec = dict(base, variant=variant, ms=ms, ms_eager=ms_eager, bytes=nbytes, **extra)
        tqdm.write(f"{shape_name} {s} {variant} {extra.get('fraction', '')}: {ms:.4f} ms")
        rec["TBps"] = nbytes / (ms * 1e-3) / 1e12
        rec["bw_vs_copy"] = rec["TBps"] / bw
        if args.profile:
            rec["kernels_us"] = _kernel_times(fn)
        if out is not None and ref is not None:
            rec["rel_err_vs_dense"] = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        records.append(rec)
        return rec

    gqa = hq != hkv
    sdpa = record(
        "sdpa", lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa), kv_bytes
    )

    def ours(config: EntmaxKVConfig):
        rot = {None: 0, True: 1, False: 2}[config.sketch_rotation]
        site = (
            100 * VARIANT_SITES[config.policy, config.sketch]
            + 10 * rot
            + (config.sketch_group or 0).bit_length()
        )
        return site, lambda: ops_cuda.decode_site(q, k, v, bias, scale, ALPHA, site, config, n_programs)

    def metadata(config: EntmaxKVConfig) -> tuple[int, int]:
        """(sketch channel group as the kernels run it, metadata bytes one step reads)."""
        plan = make_plan(tuple(q.shape), tuple(k.shape), d, config, n_programs)
        return plan.gs, round(b * hkv * s * plan.metadata_bytes_per_token(esize))

    def group_stats(site: int) -> tuple[float, float, list]:
        st = ops_cuda.site_stats(site)
        sup = st["support"].view(b * hkv, -1).amax(-1).sum().item()
        return st["candidates"].sum().item(), sup, torch.bincount(st["mode"], minlength=3).tolist()

    def guarded(variant: str, thunk, **extra):
        try:
            return thunk()
        except Exception as e:  # one failing variant must not cost the others their numbers
            tqdm.write(f"{shape_name} {s} {variant}: FAILED {e!r}"[:400])
            records.append(dict(base, variant=variant, error=repr(e)[:1000], **extra))
            return None

    def dense_variant(frac: float):
        site, fn = ours(EntmaxKVConfig(policy="dense"))
        out = fn().clone()
        _, sup, modes = group_stats(site)
        record(
            "dense", fn, kv_bytes / 2 + sup * d * esize + b * s * 4, fraction=frac, support=sup, modes=modes
        )
        return out

    def auto_variant(frac: float, dense_out: Tensor | None):
        cfg = EntmaxKVConfig()  # the default policy, "auto": what it runs depends on the cache length
        site, fn = ours(cfg)
        out = fn().clone()
        cand, sup, modes = group_stats(site)
        runs = cfg.resolve(s)
        meta = metadata(runs)[1] if runs.policy == "certified" else 0
        keys = cand * d * esize if runs.policy == "certified" else kv_bytes / 2
        record(
            "auto", fn, meta + keys + sup * d * esize + b * s * 4, out, dense_out, fraction=frac,
            runs=runs.policy, support=sup, modes=modes, metadata_bytes=meta,
        )  # fmt: skip

    def certified_variant(
        frac: float, sk: str, group: int | None, rot: bool | None, dense_out: Tensor | None
    ) -> None:
        cfg = EntmaxKVConfig(policy="certified", sketch=sk, sketch_group=group, sketch_rotation=rot)
        site, fn = ours(cfg)
        out = fn().clone()
        cand, sup, modes = group_stats(site)
        gs, meta = metadata(cfg)
        name = f"certified-{sk}" + ("" if group is None else f"-g{gs}")
        name += "" if rot is None else ("-rot" if rot else "-plain")
        record(
            name, fn, meta + cand * d * esize + sup * d * esize + b * s * 4, out, dense_out,
            fraction=frac, candidates_frac=cand / (b * hkv * s), support=sup, modes=modes,
            metadata_bytes=meta, group=gs, rotated=cfg.rotate_sketch,
        )  # fmt: skip

    def paged_variant(policy: str, div: int):
        """``topk`` or ``adaptive`` with a budget of 1/div of the pages (bytes: at the pages selected)."""
        n_pages = s // 16
        cfg = EntmaxKVConfig(policy=policy, budget_pages=max(1, n_pages // div))
        site, fn = ours(cfg)
        fn()
        rows, sup, modes = group_stats(site)  # rows: key rows of the selected pages
        meta = metadata(cfg)[1]
        record(
            f"{policy}-1/{div}", fn, meta + (rows + sup) * d * esize + b * s * 4,
            pages_frac=rows / (b * hkv * s), support=sup, modes=modes, metadata_bytes=meta,
        )  # fmt: skip

    for i, frac in enumerate(fractions):
        rows, pos, val = plants[i]
        k.view(b * hkv, s, d)[rows, pos] = val
        ops_cuda.reset_all()
        dense_out = guarded("dense", lambda f=frac: dense_variant(f), fraction=frac)
        guarded("auto", lambda f=frac, o=dense_out: auto_variant(f, o), fraction=frac)
        for sk in sketches:
            for gs in groups:
                for rot in rotations:
                    guarded(
                        f"certified-{sk}",
                        lambda f=frac, x=sk, g=gs, r=rot, o=dense_out: certified_variant(f, x, g, r, o),
                        fraction=frac,
                    )
        if i == 0:
            for policy, divs in (("topk", topk_divs), ("adaptive", adaptive_divs)):
                for div in divs:
                    guarded(f"{policy}-1/{div}", lambda p=policy, x=div: paged_variant(p, x))
    for r in records:
        if "ms" in r:
            r["ratio"] = r["ms"] / sdpa["ms"]
    return records


def _table(records: list[dict], bw: float) -> None:
    for r in records:
        if "kernels_us" in r:
            top = sorted(r["kernels_us"].items(), key=lambda kv: -kv[1])[:8]
            print(
                r["shape"],
                r["context"],
                r["variant"],
                r.get("fraction", ""),
                " ".join(f"{n[:24]}={t:.1f}" for n, t in top),
            )
    print(f"copy bandwidth {bw:.2f} TB/s (read+write)")
    print(f"{'shape':9s} {'context':>8s} {'variant':17s} {'frac':>6s} {'ms':>8s} {'eager':>8s} {'xSDPA':>6s} "
          f"{'TB/s':>5s} {'cand%':>6s} {'modes':>10s}")  # fmt: skip
    for r in records:
        if "ms" not in r:
            print(r["shape"], r["context"], r["variant"], "ERROR", r["error"][:200])
            continue
        frac = r.get("fraction", r.get("pages_frac", 0.0))
        cand = r.get("candidates_frac")
        print(
            f"{r['shape']:9s} {r['context']:8d} {r['variant']:17s} {100 * frac:5.2f}% {r['ms']:8.4f} "
            f"{r['ms_eager']:8.4f} {r.get('ratio', 1.0):6.3f} {r['TBps']:5.2f} "
            f"{'' if cand is None else f'{100 * cand:5.2f}%':>6s} {str(r.get('modes', '')):>10s}"
        )


def _plot(records: list[dict], path: Path, shapes: list[str], dense_fraction: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        lines: dict[str, list] = {}
        for r in records:
            if r["shape"] != shape or "ms" not in r:
                continue
            name = r["variant"] + (
                f" {100 * r['fraction']:g}%" if r["variant"].startswith("certified") else ""
            )
            if r["variant"] == "dense" and r["fraction"] != dense_fraction:
                continue
            lines.setdefault(name, []).append((r["context"], r["ms"]))
        for name, pts in sorted(lines.items()):
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, marker="o", label=name)
        ax.set(
            xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per decode step", title=shape
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
