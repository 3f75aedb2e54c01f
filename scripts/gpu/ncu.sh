#!/usr/bin/env bash
# Nsight Compute on one decode step per policy at 1M (scripts/gpu/ncu_step.py; ≈ 2 min on one H200, where
# ncu reads the hardware counters — Firecracker machines; --clock-control none leaves the clocks alone).
# Writes $OUT/ncu/: the report (step.ncu-rep, ~25 MB), details.txt, raw.csv, summary.txt (one line per
# launch: time, issue rate, occupancy, registers, largest stalls), and for the certified int4 and int8 sketch
# passes (score_kernel launches 0 and 2: a certified step also launches its dense tail's pass, which exits at once)
# their SASS with per-instruction counters (score_int4.csv, score_int8.csv) and hot loop (score_*.txt).
#   OUT=/tmp/out bash scripts/gpu/ncu.sh [CONTEXT]        (from the repo root)
set -u
cd "$(dirname "$0")/../.."
source scripts/gpu/env.sh
DST="${OUT:?set OUT}/ncu"
mkdir -p "$DST"
timeout 300 ncu --clock-control none --profile-from-start off --replay-mode kernel \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
  --section Occupancy --section LaunchStats --section SourceCounters --section ComputeWorkloadAnalysis \
  --section InstructionStats -o "$DST/step" python3 scripts/gpu/ncu_step.py run "${1:-1048576}" > "$DST/ncu.log" 2>&1
echo "ncu rc=$?"
ncu -i "$DST/step.ncu-rep" --page details > "$DST/details.txt" 2>&1
ncu -i "$DST/step.ncu-rep" --page raw --csv > "$DST/raw.csv" 2>&1
python3 scripts/gpu/ncu_step.py summary "$DST/raw.csv" | tee "$DST/summary.txt"
for pair in int4:0 int8:2; do
  name=${pair%:*}
  ncu -i "$DST/step.ncu-rep" --kernel-name score_kernel --launch-skip "${pair#*:}" --launch-count 1 --page source \
    --csv --print-source sass > "$DST/score_$name.csv" 2>&1
  python3 scripts/gpu/ncu_step.py hot "$DST/score_$name.csv" > "$DST/score_$name.txt"
done
