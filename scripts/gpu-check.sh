#!/usr/bin/env bash
# The GPU checks, run on a machine with an NVIDIA GPU and the driver (no Rust toolchain
# needed), sized to fit one 10-minute command (2 minutes 12 s on an H200 when every step passes):
#   1. correctness: the three-way gradient check in f64 on CUDA;
#   2. every training mode, then `savae eval`, on a small MNIST subset on CUDA;
#   3. `savae bench` on CUDA: MNIST and PTB steps of each mode (time; its GPU memory figure reads
#      the driver's used memory, which the allocator's pool hides: README, GPU), the
#      autograd reference at one configuration;
#   4. the from-scratch recipes of scripts/reproduce.sh (MNIST and PTB, implicit and
#      unrolled SA-VAE, PTB vae-svi) for 40 training steps each: seconds per step on the GPU,
#      against the CPU's in bench/results, to say whether a GPU carries the long runs.
# The recipes' flags are reproduce.sh's, from scripts/models.sh.
# Results go to $OUT (default bench/results/gpu/): JSON lines per step and log.txt.
#
#   scripts/gpu-check.sh [path/to/savae-or-savae.xz]   (default .gpu/savae.xz)
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/models.sh
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
SRC=${1:-.gpu/savae.xz}
BIN=/tmp/savae-cuda
case "$SRC" in
  *.xz) python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$SRC" "$BIN" ;;
  *) cp "$SRC" "$BIN" ;;
esac
chmod +x "$BIN"
# DEVICE=cpu and a SCALE below 1 (timeouts scaled) check the script itself off the GPU.
DEV=${DEVICE:-cuda}
SCALE=${SCALE:-1}
# CUDA 13 cuBLAS/cuRAND/NVRTC: from the machine's Python packages if there, else $SAVAE_CUDA_LIBS.
LIBS=${SAVAE_CUDA_LIBS:-$(ls -d /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -1)}
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LIBS}
T0=$(date +%s)
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/log.txt"; }
# run TIMEOUT OUTFILE ARGS...: one savae command, its stdout appended to OUTFILE, stderr
# to log.txt, its exit status and time logged.
run() {
  local t=$1 out=$2
  shift 2
  local s
  s=$(date +%s)
  timeout "$(python3 -c "print(max(1, round($t * $SCALE)))")" "$BIN" "$@" >>"$OUT/$out" 2>>"$OUT/log.txt"
  log "exit $? ($(( $(date +%s) - s ))s): savae $*"
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
ldd "$BIN" | grep -E "cuda|cublas|curand|nvrtc" >>"$OUT/log.txt"

log "1. gradcheck f64 on cuda"
run 90 gradcheck.json gradcheck --device "$DEV" --examples 4 --fd-params 8 --svi-steps 1500

log "2. every mode on cuda: 1 epoch of 2000 images, then eval"
for m in "vae" "vae-svi" "savae --grad implicit" "savae --grad unrolled" "svi"; do
  d=/tmp/run-$(echo "$m" | tr -d ' -')
  run 60 train.jsonl train --device "$DEV" --model $m --epochs 1 --max-train-examples 2000 \
    --valid-examples 500 --svi-steps 10 --run-dir "$d" --overwrite --quiet
  run 45 eval.jsonl eval --device "$DEV" --checkpoint "$d/last.safetensors" --max-examples 500 \
    --iw-samples 100 --quiet
done

log "3. bench on cuda"
run 90 bench.jsonl bench --device "$DEV" --batch 100,1024 --k 10 --steps 5 --warmup 2 \
  --passes analytic --modes vae,vae-svi,savae-unrolled,savae-implicit
run 45 bench.jsonl bench --device "$DEV" --batch 100 --k 10 --steps 5 --warmup 2 \
  --passes autograd --modes savae-implicit,savae-unrolled
run 90 bench.jsonl bench --device "$DEV" --dataset ptb --k 10 --steps 5 --warmup 2 \
  --modes lm,vae,savae-implicit,savae-unrolled

log "4. the from-scratch recipes of reproduce.sh, 40 steps each"
# time_recipe NAME TIMEOUT DATA_FLAGS...: NAME's flags (scripts/models.sh) on DATA_FLAGS for
# one epoch, its median seconds per step a JSON line in recipes.jsonl.
time_recipe() {
  local name=$1 t=$2
  shift 2
  model_flags "$name" || return
  run "$t" recipes.log train --device "$DEV" --epochs 1 --log-every 5 --run-dir "/tmp/recipe-$name" \
    --overwrite --quiet "$@" "${FLAGS[@]}"
  if [ -f "/tmp/recipe-$name/metrics.jsonl" ]; then
    python3 - "$name" "/tmp/recipe-$name/metrics.jsonl" "$DEV" >>"$OUT/recipes.jsonl" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
rows = [json.loads(l) for l in open(path)]
steps = [r for r in rows if r.get("kind") == "step"]
epochs = [r for r in rows if r.get("kind") == "epoch"]
secs = sorted(r["step_seconds"] for r in steps[2:]) or [None]
print(json.dumps({"recipe": name, "device": sys.argv[3], "logged_steps": len(steps),
                  "median_step_seconds": secs[len(secs) // 2],
                  "last_step": steps[-1] if steps else None,
                  "epoch": epochs[-1] if epochs else None}))
PY
  fi
}
mn=(--dataset mnist --max-train-examples 4000 --valid-examples 500)
time_recipe mnist-savae-implicit 90 "${mn[@]}"
time_recipe mnist-savae-unrolled 60 "${mn[@]}"
pt=(--dataset ptb --max-train-examples 1280 --valid-examples 100)
time_recipe ptb-savae-implicit 120 "${pt[@]}"
time_recipe ptb-savae-unrolled 90 "${pt[@]}"
time_recipe ptb-vae-svi 60 "${pt[@]}"
log "done"
