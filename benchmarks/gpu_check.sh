#!/usr/bin/env bash
# GPU checks for streamprune on a lent H200, in at most ~8 minutes; every step has its own timeout and the script
# prints whatever it measured even when a step runs out of time.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine (repo root as working dir, python3 with torch+CUDA)
#   bash benchmarks/gpu_check.sh --dry-run    # anywhere: tiny shapes, --device cpu, 4 x 64 tokens (about 1-2 min)
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh
#
# (a) SmolLM2-135M from benchmarks/assets/smollm2 (or $SMOLLM2_DIR) if present: prune on CUDA float32 and CPU
#     float32 with the same JSONL calibration; mask disagreement and time. Skipped without the directory.
# (b) 3 synthetic Llama-2-70B-shaped blocks (bf16, vocab 1024): prune on cuda in bf16 with 128 x 2048 random
#     tokens under --gpu-memory-limit 24GB; per-block time, peak GPU/host memory, extrapolation to 80 blocks.
# (c) 2 synthetic Llama-3.1-405B-shaped blocks, same settings plus --activations cpu; extrapolation to 126 blocks.
# (d) `streamprune plan` predictions printed next to each measurement.
# (e) a tiny Qwen3-MoE (8 experts, top-4) pruned with its experts in groups of 3 and whole: bit-identical on CUDA too.
# Environment: GPU_CHECK_BUDGET (seconds, default 470), GPU_CHECK_WORK (scratch dir, default /tmp/streamprune-gpu-check),
# PYTHON (default python3), SMOLLM2_DIR, GPU_CHECK_RESULTS (raw JSON; default $OUT/gpu_check when $OUT is set).

set -u
TOTAL=${GPU_CHECK_BUDGET:-470}
DRY=${GPU_CHECK_DRY:-0}
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-/tmp/streamprune-gpu-check}
RESULTS=${GPU_CHECK_RESULTS:-${OUT:+$OUT/gpu_check}}
RESULTS=${RESULTS:-$WORK/results}
rm -rf "$WORK"; mkdir -p "$WORK" "$RESULTS"
SECONDS=0

if [ "$DRY" = 1 ]; then
  DEVICE=cpu; GEN_DEVICE=cpu; NS=4; SL=64; A_NS=2; A_SL=32; CDTYPE=float32
  SHAPE70="--hidden 256 --intermediate 512 --heads 8 --kv-heads 2"
  SHAPE405="--hidden 512 --intermediate 1024 --heads 8 --kv-heads 2"
  A_DEVICES="cpu cpu"; PLAN_GPU=""
else
  DEVICE=cuda; GEN_DEVICE=cuda; NS=128; SL=2048; A_NS=16; A_SL=256; CDTYPE=bf16
  SHAPE70=""; SHAPE405=""
  A_DEVICES="cuda cpu"; PLAN_GPU="--gpu-memory 24GB"
fi
LIMIT="--gpu-memory-limit 24GB"

say() { printf '%s\n' "$*"; }
hr() { say ""; say "==== $* ==== (t=${SECONDS}s)"; }

# run_step LABEL BUDGET OUTFILE CMD... : run under timeout (stdout to OUTFILE, or - for the terminal), never past
# the global deadline
run_step() {
  local label=$1 budget=$2 outfile=$3; shift 3
  local left=$(( TOTAL - SECONDS - 8 ))
  (( budget > left )) && budget=$left
  if (( budget < 5 )); then say "[$label] SKIPPED: out of time"; return 124; fi
  local t0=$SECONDS rc
  if [ "$outfile" = - ]; then timeout -k 5 "$budget" "$@"; rc=$?
  else timeout -k 5 "$budget" "$@" > "$outfile"; rc=$?; fi
  if (( rc == 124 || rc == 137 )); then say "[$label] TIMED OUT after ${budget}s"
  elif (( rc != 0 )); then say "[$label] FAILED (exit $rc)"
  else say "[$label] done in $(( SECONDS - t0 ))s"; fi
  return $rc
}

hr "environment"
say "dry run: $DRY  device: $DEVICE  calibration: $NS x $SL  budget: ${TOTAL}s  work: $WORK"
$PY - <<'EOF'
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, {p.total_memory / 2**30:.1f} GiB, free {torch.cuda.mem_get_info()[0] / 2**30:.1f} GiB")
import os, psutil
print(f"host: {os.cpu_count()} cpus, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
      f"{psutil.virtual_memory().available / 2**30:.0f} GiB available")
EOF
df -h "$WORK" | tail -1

# one calibration file for every step: random ids below 1024 are valid for all models used here
CALIB=$WORK/calib.jsonl
$PY - "$CALIB" "$NS" "$SL" <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
from synthetic import write_calibration
write_calibration(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), 1024)
EOF

# report JSON_SUMMARY JSON_PLAN TOTAL_BLOCKS LABEL : per-block time, extrapolation, memory vs plan
report() {
  $PY - "$@" <<'EOF'
import json, sys
summary_path, plan_path, total, label = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
G = 1e9
def gb(x): return "-" if x is None else f"{x / G:.2f} GB"
try:
    s = json.load(open(summary_path))
except Exception as e:
    print(f"[{label}] no summary ({e})"); sys.exit(0)
try:
    p = json.load(open(plan_path))["plan"]
except Exception:
    p = {}
ph, n = s["phase_seconds"], s["blocks_committed"]
compute = sum(ph.get(k, 0) for k in ("read", "statistics", "prune", "propagate"))
per_block = max(compute, ph.get("write", 0)) / max(n, 1)
extra = s["wall_seconds"] + (total - n) * per_block
print(f"[{label}] blocks {n}/{s['blocks']}, wall {s['wall_seconds']:.1f}s, device {s['device']} ({s['compute_dtype']}), "
      f"activations {s['activations']}, {s['nsamples']} x {s['seqlen']} tokens, sparsity {s['sparsity']:.4f}")
print(f"[{label}] phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in ph.items()))
print(f"[{label}] per block: {per_block:.2f}s (max of foreground read+statistics+prune+propagate and background write, / blocks)")
print(f"[{label}] extrapolated whole model ({total} blocks): {extra:.0f}s = {extra / 60:.1f} min")
print(f"[{label}] peak GPU allocated {gb(s.get('peak_gpu_bytes'))} (reserved {gb(s.get('peak_gpu_reserved_bytes'))}), "
      f"plan (streamprune plan) {gb(p.get('peak_gpu_bytes'))}; job's own plan {gb((s.get('plan') or {}).get('peak_gpu_bytes'))}")
print(f"[{label}] peak host RSS {gb(s['peak_rss_bytes'])} (anon {gb(s['peak_anon_bytes'])}, file-backed "
      f"{gb(s['peak_file_backed_bytes'])}), plan {gb(p.get('peak_host_bytes'))}; job's own plan "
      f"{gb((s.get('plan') or {}).get('peak_host_bytes'))}, tier {(s.get('plan') or {}).get('tier')}")
mg, pg = s.get("peak_gpu_bytes"), p.get("peak_gpu_bytes")
if mg and pg:
    print(f"[{label}] GPU prediction error {100 * (pg - mg) / mg:+.1f}%  (plan vs max_memory_allocated)")
if p.get("peak_host_bytes"):
    print(f"[{label}] host prediction error {100 * (p['peak_host_bytes'] - s['peak_rss_bytes']) / s['peak_rss_bytes']:+.1f}%")
EOF
}

# partial STATUS_OUT_DIR LABEL : what a timed-out job committed
partial() {
  $PY -m streamprune status "$1" --json 2>/dev/null | $PY -c "
import json, sys
try:
    st = json.load(sys.stdin)
except Exception:
    print('[$2] no job state'); sys.exit(0)
print(f\"[$2] partial: {st['blocks_done']}/{st['blocks_total']} blocks committed in {st['seconds']:.0f}s\")
" || true
}

# ------------------------------------------------------------------------------------------------- (a)
hr "(a) SmolLM2-135M: CUDA float32 vs CPU float32 masks"
SMOL=${SMOLLM2_DIR:-benchmarks/assets/smollm2}
if [ -f "$SMOL/config.json" ]; then
  set -- $A_DEVICES
  for dev in "$1" "$2"; do
    tag=$dev; [ -d "$WORK/a-$tag" ] && tag=${dev}2
    run_step "(a) prune on $dev" 75 "$WORK/a-$tag.json" $PY -m streamprune prune "$SMOL" "$WORK/a-$tag" --calib "$CALIB" \
      --nsamples $A_NS --seqlen $A_SL --device "$dev" --dtype float32 --json --no-progress
    $PY -c "import json; s = json.load(open('$WORK/a-$tag.json')); print(f\"[(a) $dev] blocks {s['blocks_committed']}/{s['blocks']}, wall {s['wall_seconds']:.1f}s, phases {s['phase_seconds']}\")" 2>/dev/null || true
  done
  dirs=$(for d in "$WORK"/a-*/; do [ -f "$d/.streamprune/state.json" ] && grep -q '"complete": *true' "$d/.streamprune/state.json" && echo "$d"; done | head -2 | tr '\n' ' ')
  run_step "(a) compare" 40 - $PY - $dirs <<'EOF'
import sys
sys.path.insert(0, "benchmarks")
from throughput import compare_checkpoints
if len(sys.argv) < 3:
    print("[(a)] fewer than two complete pruned outputs; nothing to compare"); sys.exit(0)
try:
    r = compare_checkpoints(sys.argv[1], sys.argv[2])
except Exception as e:  # noqa: BLE001
    print(f"[(a)] comparison failed: {type(e).__name__}: {e}"); sys.exit(0)
print(f"[(a)] {sys.argv[1]} vs {sys.argv[2]}: mask entries differing {r['mask_entries_differing']} of {r['mask_entries']} "
      f"({100 * r['mask_entries_differing'] / max(1, r['mask_entries']):.4f}%), tensors bit-identical: "
      f"{r['tensors_compared'] - r['tensors_differing']}/{r['tensors_compared']}")
EOF
  rm -rf "$WORK"/a-*/
else
  say "[(a)] SKIPPED: no $SMOL/config.json (copy the SmolLM2 checkpoint there to run it)"
fi

# ------------------------------------------------------------------------------------------------- (b)
hr "(b) Llama-2-70B shape, 3 blocks, $NS x $SL tokens, $DEVICE $CDTYPE, $LIMIT"
M70=$WORK/m70
run_step "(b) generate" 90 - $PY benchmarks/synthetic.py "$M70" --shape 70b --layers 3 --device "$GEN_DEVICE" $SHAPE70 --quiet
run_step "(b) plan" 30 "$RESULTS/b-plan.json" $PY -m streamprune plan "$M70" --json --nsamples $NS --seqlen $SL $PLAN_GPU
run_step "(b) prune" 150 "$RESULTS/b-prune.json" $PY -m streamprune prune "$M70" "$WORK/o70" --calib "$CALIB" --nsamples $NS --seqlen $SL \
  --device $DEVICE $LIMIT --json --no-progress || partial "$WORK/o70" "(b)"
report "$RESULTS/b-prune.json" "$RESULTS/b-plan.json" 80 "(b) 70B"
rm -rf "$M70" "$WORK/o70"

# ------------------------------------------------------------------------------------------------- (c)
hr "(c) Llama-3.1-405B shape, 2 blocks, $NS x $SL tokens, $DEVICE $CDTYPE, $LIMIT, --activations cpu"
M405=$WORK/m405
run_step "(c) generate" 110 - $PY benchmarks/synthetic.py "$M405" --shape 405b --layers 2 --device "$GEN_DEVICE" $SHAPE405 --quiet
run_step "(c) plan" 30 "$RESULTS/c-plan.json" $PY -m streamprune plan "$M405" --json --nsamples $NS --seqlen $SL \
  $PLAN_GPU --activations cpu
run_step "(c) prune" 170 "$RESULTS/c-prune.json" $PY -m streamprune prune "$M405" "$WORK/o405" --calib "$CALIB" --nsamples $NS --seqlen $SL \
  --device $DEVICE $LIMIT --activations cpu --json --no-progress || partial "$WORK/o405" "(c)"
report "$RESULTS/c-prune.json" "$RESULTS/c-plan.json" 126 "(c) 405B"
rm -rf "$M405" "$WORK/o405"

# ------------------------------------------------------------------------------------------------- (e)
hr "(e) Mixture-of-Experts: experts streamed in groups on $DEVICE vs the whole block, bit for bit"
run_step "(e) groups" 60 - $PY - "$DEVICE" "$WORK/moe" <<'EOF'
import sys
sys.path.insert(0, "tests")
from pathlib import Path
import torch
import streamprune
from test_groups import wide_qwen3
from tiny import tensors, write_ids
device, root = sys.argv[1], Path(sys.argv[2])
root.mkdir(parents=True, exist_ok=True)
calib = write_ids(root / "ids.jsonl", 8, 32)
model = wide_qwen3(root / "m")
kw = dict(calib=str(calib), nsamples=8, seqlen=32, progress=False, device=device, dtype="float32")
for method in ("wanda", "sparsegpt"):
    w = streamprune.prune(model, root / f"{method}-whole", method=method, **kw)
    g = streamprune.prune(model, root / f"{method}-g3", method=method, expert_group=3, **kw)
    a, b = tensors(root / f"{method}-whole"), tensors(root / f"{method}-g3")
    same = sum(torch.equal(a[k], b[k]) for k in a)
    print(f"[(e)] {method}: {same}/{len(a)} tensors bit-identical, groups of {g['expert_group']}, peak GPU bytes "
          f"whole {w.get('peak_gpu_bytes')} grouped {g.get('peak_gpu_bytes')}")
EOF
rm -rf "$WORK/moe"

# ------------------------------------------------------------------------------------------------- (d)
hr "(d) summary: measured vs streamprune plan"
for step in b c; do
  $PY - "$RESULTS/$step-prune.json" "$RESULTS/$step-plan.json" "$step" <<'EOF'
import json, sys
G = 1e9
try:
    s = json.load(open(sys.argv[1])); p = json.load(open(sys.argv[2]))["plan"]
except Exception as e:
    print(f"({sys.argv[3]}) incomplete: {e}"); sys.exit(0)
g = lambda x: "-" if x is None else f"{x / G:.2f}"
print(f"({sys.argv[3]}) GPU GB measured {g(s.get('peak_gpu_bytes'))} / predicted {g(p.get('peak_gpu_bytes'))};  "
      f"host GB measured {g(s['peak_rss_bytes'])} / predicted {g(p.get('peak_host_bytes'))};  tier {p.get('tier')}")
EOF
done
say "raw JSON in $RESULTS; total ${SECONDS}s"
