#!/usr/bin/env bash
# GPU kernels check + benchmark (≤ 150 s wall): the GPU-marked kernel tests, then one decode step at the
# standard shape (B=1, Hq 32/Hkv 8, D 128, bf16) at 32K/128K/1M — SDPA, dense entmax, certified int8/int4
# (0.2% and 1.5% candidates), top-k 1/16 and 1/64 — into $OUT/kernels/ (kernels.json, kernels.png, logs),
# then a compact table of time / SDPA time. Each step is time-boxed; a failing step does not stop the next.
set -u
export PYTHONPATH=.
PY=${PYTHON:-$(command -v python || command -v python3)}
DST="${OUT:?set OUT}/kernels"
mkdir -p "$DST"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader > "$DST/gpu.txt" 2>&1 || true

if [ -z "${SKIP_TESTS:-}" ]; then  # scripts/gpu/run_all.sh runs the whole GPU suite itself
  timeout 70 "$PY" -m pytest -m gpu -q --no-header -p no:cacheprovider tests/gpu/ \
      > "$DST/gpu_tests.log" 2>&1
  echo "gpu tests: rc=$? $(tail -n 1 "$DST/gpu_tests.log")"
fi

timeout 75 "$PY" -m entmaxkv_compile.bench kernels --out "$DST" --shapes standard \
    --contexts 32768,131072,1048576 --fractions 0.002,0.015 --topk 16,64 --reps 20 --warmup 3 \
    > "$DST/bench.log" 2>&1
echo "benchmark: rc=$? (log: $DST/bench.log)"

"$PY" - "$DST/kernels.json" <<'PYEOF' || echo "no kernels.json"
import json, sys
res = json.load(open(sys.argv[1]))
rows, ctxs = {}, sorted({r["context"] for r in res["records"]})
for r in res["records"]:
    name = r["variant"] + (f" {100 * r['fraction']:g}%" if "fraction" in r and r["variant"] != "sdpa" else "")
    rows.setdefault(name, {})[r["context"]] = r
print(f"copy {res['copy_TBps']:.2f} TB/s; time / SDPA (lower is better); SDPA row in ms")
print(f"{'variant':24s}" + "".join(f"{c // 1024:>9d}K" for c in ctxs))
for name, by in rows.items():
    cells = []
    for c in ctxs:
        r = by.get(c)
        if r is None:
            cells.append(f"{'-':>10s}")
        elif "ms" not in r:
            cells.append(f"{'ERR':>10s}")
        else:
            cells.append(f"{r['ms']:10.4f}" if r["variant"] == "sdpa" else f"{r['ratio']:9.3f}x")
    print(f"{name:24s}" + "".join(cells))
PYEOF
