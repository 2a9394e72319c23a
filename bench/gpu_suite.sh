#!/usr/bin/env bash
# The GPU suite: on a machine with one GPU, install the GPU extra, then within a time budget
# (default 470 s, under 8 minutes) run, in priority order:
#   - tests/test_attention_kernels.py natively (cuDNN and Pallas GPU segment kernels vs XLA),
#   - the MFU table: bench/train_step.py at 350m and 1b, seq 2048, bf16 compute, attention
#     xla / cudnn (and any segment kernel wired into model.attention), remat none /
#     dots_no_batch / full,
#   - the peers at the same shapes: bench/peers_train.py (hibari, plain JAX, torch.compile).
# Each row has its own timeout; a failed or timed-out row is recorded and the others still run;
# rows that no longer fit the budget are recorded as skipped. Results: OUTDIR/results.jsonl,
# OUTDIR/table.md (printed too), one log per row in OUTDIR/logs/.
#
#   bash bench/gpu_suite.sh [OUTDIR]              # install + run (SKIP_INSTALL=1: no pip)
#   bash bench/gpu_suite.sh --table FILE.jsonl    # only print the markdown table of a JSONL
#
# Environment: PYTHON (default python), SUITE_BUDGET_S (470), BATCH_350M (8), BATCH_1B (4),
# PEERS_BATCH_350M (4), PEERS_BATCH_1B (2): the peers hold three models and plain JAX keeps
# full attention scores, so their batches are smaller. Batches are sized for 80 GB.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python}

write_table() {  # write_table FILE.jsonl -> markdown on stdout
  "$PY" - "$1" <<'PYEOF'
import json
import sys
from collections import defaultdict

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]


def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else (x if x is not None else "-")


steps = [r for r in rows if "tokens_per_s" in r or ("size" in r and "xla_memory_bytes" in r)]
peers = [r for r in rows if r.get("part") == "train" and "system" in r]
status = [r for r in rows if "suite_row" in r]
out = []
if steps:
    out += ["## Train step (bench/train_step.py)", "",
            "| config | batch x seq | tokens/s | MFU | peak mem GiB | step ms |",
            "|---|---|---:|---:|---:|---:|"]
    for r in steps:
        mfu = r.get("mfu")
        mfu = f"{100 * mfu:.1f}%" if isinstance(mfu, (int, float)) else fmt(mfu, "")
        peak = r.get("peak_bytes_in_use")
        out.append(
            f"| {r['size']} {r.get('compute_dtype', '?')} attn={r.get('attention', '?')} "
            f"remat={r.get('remat', '?')} | {r.get('batch')} x {r.get('seq')} "
            f"| {fmt(r.get('tokens_per_s'), ',.0f')} | {mfu} "
            f"| {fmt(peak / 2**30 if peak else None, '.1f')} | {fmt(r.get('step_ms'), '.1f')} |")
    out.append(f"\ndevice: {steps[0].get('device')}, jax {steps[0].get('jax')}")
if peers:
    out += ["", "## Peers (bench/peers_train.py)", "",
            "| work | system | tokens/s (best) | tokens/s (median) | hibari / system |",
            "|---|---|---:|---:|---:|"]
    by_work = defaultdict(list)
    for r in peers:
        by_work[r["work"]].append(r)
    for work, group in by_work.items():
        hib = next((r for r in group if r.get("peer", r["system"]) == "hibari"), None)
        for r in group:
            ratio = hib["units_per_s"] / r["units_per_s"] if hib and r is not hib else None
            out.append(f"| {work} | {r['system']} | {fmt(r['units_per_s'], ',.0f')} "
                       f"| {fmt(r.get('units_per_s_median'), ',.0f')} | {fmt(ratio, '.2f')} |")
    out.append(f"\nload {peers[0].get('load')}, versions {peers[0].get('versions')}")
if status:
    out += ["", "## Rows", "", "| row | status | seconds | note |", "|---|---|---:|---|"]
    for r in status:
        note = str(r.get("note", "")).replace("|", "/")[:200]
        out.append(f"| {r['suite_row']} | {r['status']} | {fmt(r.get('seconds'), '.0f')} "
                   f"| {note} |")
print("\n".join(out) if out else "(no rows)")
PYEOF
}

if [[ "${1:-}" == "--table" ]]; then
  [[ -f "${2:-}" ]] || { echo "gpu_suite.sh --table: give a JSONL file" >&2; exit 2; }
  write_table "$2"
  exit $?
fi

OUT=${1:-gpu-suite-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT/logs" || exit 1
JSONL="$OUT/results.jsonl"
BUDGET=${SUITE_BUDGET_S:-470}
B350=${BATCH_350M:-8}
B1B=${BATCH_1B:-4}
PB350=${PEERS_BATCH_350M:-4}
PB1B=${PEERS_BATCH_1B:-2}

if [[ -z "${SKIP_INSTALL:-}" ]]; then
  "$PY" -m pip install -q -e ".[gpu,test]" || { echo "pip install failed" >&2; exit 1; }
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
export JAX_PLATFORMS=cuda
# A compile cache shared by reruns of the suite on the same machine.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/hibari-gpu-suite-jax}
START=$SECONDS

record() {  # record ROW STATUS SECONDS NOTE
  "$PY" -c 'import json, sys
print(json.dumps({"suite_row": sys.argv[1], "status": sys.argv[2],
                  "seconds": float(sys.argv[3]), "note": sys.argv[4]}))' \
    "$1" "$2" "$3" "$4" >> "$JSONL"
}

run_row() {  # run_row NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2 left t0 rc log
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  if ((left < 45)); then
    record "$name" "skipped" 0 "budget: ${left}s left of ${BUDGET}s"
    return
  fi
  ((limit > left)) && limit=$left
  log="$OUT/logs/$name.log"
  echo "== $name (timeout ${limit}s, ${left}s left)" >&2
  t0=$SECONDS
  timeout -k 10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  if ((rc == 0)); then
    record "$name" "ok" $((SECONDS - t0)) "$(tail -n 1 "$log" | cut -c1-160)"
  elif ((rc == 124 || rc == 137)); then
    record "$name" "timeout" $((SECONDS - t0)) "killed after ${limit}s: $(tail -n 1 "$log")"
  else
    record "$name" "failed rc=$rc" $((SECONDS - t0)) \
      "$(grep -E '^[A-Za-z_.]*(Error|Exception)|^(FAILED|ERROR) ' "$log" | tail -n 2 | tr '\n' ' ')"
  fi
}

step() {  # step SIZE BATCH ATTENTION REMAT [TIMEOUT]
  run_row "step-$1-$3-$4" "${5:-120}" "$PY" bench/train_step.py --size "$1" --batch "$2" \
    --seq 2048 --steps 10 --warmup 2 --set model.compute_dtype=bfloat16 \
    --set model.param_dtype=float32 --set "model.attention=$3" --set "model.remat=$4" \
    --out "$JSONL"
}

peers() {  # peers SIZE BATCH [TIMEOUT]
  # JAX and torch share the GPU in one process: no JAX preallocation.
  run_row "peers-$1" "${3:-240}" env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" bench/peers_train.py \
    --size "$1" --batch "$2" --seq 2048 --dtype bfloat16 --attention cudnn --remat none \
    --peers hibari,jax,torch_compile --rounds 3 --out "$JSONL"
}

# The GPU segment kernels as model.attention values (model/transformer.py SEGMENT_KERNELS;
# "splash" is the TPU one).
WIRED="cudnn_segments pallas_gpu"

run_row kernels 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_attention_kernels.py
step 350m "$B350" cudnn dots_no_batch
step 350m "$B350" xla dots_no_batch
step 1b "$B1B" cudnn dots_no_batch 150
step 1b "$B1B" xla dots_no_batch 150
for kernel in $WIRED; do
  step 350m "$B350" "$kernel" dots_no_batch
done
peers 350m "$PB350"
step 350m "$B350" cudnn none
step 350m "$B350" cudnn full
step 1b "$B1B" cudnn full 150
step 1b "$B1B" cudnn none 150
step 350m "$((B350 / 2))" xla none   # full fp32 attention scores are kept: half the batch
step 1b "$B1B" xla full 150
peers 1b "$PB1B" 300

write_table "$JSONL" | tee "$OUT/table.md"
echo "suite: $((SECONDS - START))s of ${BUDGET}s; results in $OUT" >&2
