"""One decode step per policy under Nsight Compute, and a summary of what it recorded.

``python3 scripts/gpu/ncu_step.py run [CONTEXT]`` warms each policy up (certified int4, certified int8, top-k
1/64; standard shape, planted decoys at 0.2%, a per-token bias as a decoding model passes) and runs one more
step of each between ``cudaProfilerStart``/``Stop`` with programmatic dependent launch off, so
``ncu --profile-from-start off`` records exactly those launches, each on its own.
``python3 scripts/gpu/ncu_step.py summary RAW_CSV`` prints one line per recorded launch from
``ncu -i REPORT --page raw --csv``: time, issue rate, occupancy, registers and the four largest stall
reasons (cycles a warp waits per issued instruction).
``python3 scripts/gpu/ncu_step.py hot SOURCE_CSV`` lists the SASS of a kernel's hottest loop from
``ncu -i REPORT --page source --csv --print-source sass`` (the instructions executed most often) with each
one's share of the stall samples and its two largest stall reasons.
"""

from __future__ import annotations

import csv
import sys


def run(context: int) -> None:
    import torch

    from entmaxkv_compile.bench.kernels import ALPHA, SHAPES, planted
    from entmaxkv_compile.config import EntmaxKVConfig
    from entmaxkv_compile.kernels import launch
    from entmaxkv_compile.ops import cuda as ops_cuda

    launch.PDL = False  # a launch started early would count its wait for the previous one
    shape = SHAPES["standard"]
    q, k, v, plants = planted(shape, context, [0.002])
    rows, pos, val = plants[0]
    b, hkv, d = shape["b"], shape["hkv"], shape["d"]
    k.view(b * hkv, context, d)[rows, pos] = val
    bias = torch.zeros(b, 1, 1, context, device="cuda")
    programs = ops_cuda.PROGRAMS_PER_SM * torch.cuda.get_device_properties(0).multi_processor_count
    configs = {
        "certified-int4": EntmaxKVConfig(policy="certified", sketch="int4"),
        "certified-int8": EntmaxKVConfig(policy="certified", sketch="int8"),
        "topk-1/64": EntmaxKVConfig(policy="topk", budget_pages=max(1, context // 16 // 64)),
    }
    for site, (name, cfg) in enumerate(configs.items(), start=1):
        for _ in range(3):
            ops_cuda.decode_site(q, k, v, bias, d**-0.5, ALPHA, site, cfg, programs)
        torch.cuda.synchronize()
        print(name, "modes", ops_cuda.site_stats(site)["mode"].tolist(), flush=True)
        torch.cuda.profiler.start()
        ops_cuda.decode_site(q, k, v, bias, d**-0.5, ALPHA, site, cfg, programs)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


def _num(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except ValueError:
        return float("nan")


def _rows(path: str) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def summary(path: str) -> None:
    rows = _rows(path)
    hdr, data = rows[0], rows[2:]  # row 1 holds the units
    col = {h: i for i, h in enumerate(hdr)}
    pre = "smsp__average_warps_issue_stalled_"
    stalls = [h for h in hdr if h.startswith(pre) and h.endswith("_per_issue_active.ratio")]
    print(f"{'#':>2} {'kernel':20s} {'µs':>7s} {'IPC':>5s} {'occ%':>5s} {'regs':>4s}  stalls per issue")
    for i, r in enumerate(data):
        top = sorted(((_num(r[col[h]]), h[len(pre) :].split("_per_")[0]) for h in stalls), reverse=True)[:4]
        print(
            f"{i:2d} {r[col['Kernel Name']]:20s} {_num(r[col['gpu__time_duration.sum']]):7.1f}"
            f" {_num(r[col['sm__inst_executed.avg.per_cycle_active']]):5.2f}"
            f" {_num(r[col['sm__warps_active.avg.pct_of_peak_sustained_active']]):5.1f}"
            f" {_num(r[col['launch__registers_per_thread']]):4.0f}  "
            + " ".join(f"{n} {v:.2f}" for v, n in top)
        )


def hot(path: str) -> None:
    rows = _rows(path)
    hdr, data = rows[1], rows[2:]  # row 0 names the kernel
    col = {h: i for i, h in enumerate(hdr)}
    samples = [_num(r[col["Warp Stall Sampling (All Samples)"]]) for r in data]
    execs = [_num(r[col["Instructions Executed"]]) for r in data]
    stalls = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    # the loop body: the execution count that accounts for the most executed instructions
    most = max(set(execs), key=lambda c: c * execs.count(c))
    loop = [i for i, e in enumerate(execs) if e == most]
    total = sum(samples)
    share = 100 * sum(samples[i] for i in loop) / total
    print(f"{len(loop)} instructions executed {most:.0f} times each: {share:.1f}% of the stall samples")
    for i in loop:
        r = data[i]
        top = sorted(((_num(r[col[h]]), h[6:]) for h in stalls), reverse=True)[:2]
        why = " ".join(f"{n}:{v:.0f}" for v, n in top if v > 0)
        print(f"{100 * samples[i] / total:5.2f}% {r[col['Source']].strip()[:64]:64s} {why}")


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "run"
    if cmd == "run":
        run(int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 20)
    elif cmd == "summary":
        summary(sys.argv[2])
    elif cmd == "hot":
        hot(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} run [CONTEXT] | summary RAW_CSV | hot SOURCE_CSV")
