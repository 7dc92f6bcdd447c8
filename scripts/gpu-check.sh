#!/usr/bin/env bash
# The GPU checks, run on a machine with an NVIDIA GPU and the driver (no Rust toolchain
# needed): correctness (gradient check in f64 on CUDA), every training mode and eval on
# CUDA, the benchmark, then the text model (train, eval, tokens/s). Results go to $OUT
# (default bench/results/).
#
#   scripts/gpu-check.sh [path/to/savae-or-savae.xz]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
SRC=${1:-.gpu/savae.xz}
BIN=/tmp/savae-cuda
case "$SRC" in
  *.xz) python3 -c "import lzma,shutil,sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2],'wb'))" "$SRC" "$BIN" ;;
  *) cp "$SRC" "$BIN" ;;
esac
chmod +x "$BIN"
# CUDA 13 cuBLAS/cuRAND: from the machine's Python packages if there, else $SAVAE_CUDA_LIBS.
LIBS=${SAVAE_CUDA_LIBS:-$(ls -d /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -1)}
export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:${LIBS}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
ldd "$BIN" | grep -E "cuda|cublas|curand" | tee "$OUT/ldd.txt"
step() { echo "== $*" | tee -a "$OUT/log.txt"; }
step gradcheck f64 on cuda
timeout 120 "$BIN" gradcheck --device cuda --examples 4 --fd-params 8 --svi-steps 1500 > "$OUT/gradcheck_cuda.json" 2>>"$OUT/log.txt"; echo "exit $?" | tee -a "$OUT/log.txt"
cat "$OUT/gradcheck_cuda.json" | cut -c1-400
for m in "vae" "vae-svi" "savae --grad implicit" "savae --grad unrolled" "svi"; do
  d=/tmp/run-$(echo $m | tr -d ' -')
  step train $m on cuda
  timeout 120 "$BIN" train --device cuda --model $m --epochs 1 --max-train-examples 5000 --valid-examples 1000 \
    --batch-size 100 --svi-steps 10 --run-dir $d --overwrite --quiet >> "$OUT/train_cuda.jsonl" 2>>"$OUT/log.txt"; echo "exit $?" | tee -a "$OUT/log.txt"
  timeout 60 "$BIN" eval --device cuda --checkpoint $d/last.safetensors --max-examples 500 --iw-samples 100 --quiet >> "$OUT/eval_cuda.jsonl" 2>>"$OUT/log.txt"; echo "exit $?" | tee -a "$OUT/log.txt"
done
step bench on cuda
timeout 300 "$BIN" bench --device cuda --batch 1024,64 --k 20,50,5 --steps 10 --warmup 3 \
  --passes analytic --modes savae-implicit,savae-unrolled,vae-svi,vae | tee "$OUT/bench_cuda.jsonl"
echo "exit $?" | tee -a "$OUT/log.txt"
# The autograd reference at one configuration, for the analytic/autograd ratio on the GPU.
timeout 120 "$BIN" bench --device cuda --batch 1024 --k 20 --steps 10 --warmup 3 \
  --passes autograd --modes savae-implicit,savae-unrolled | tee -a "$OUT/bench_cuda.jsonl"
echo "exit $?" | tee -a "$OUT/log.txt"
step text on cuda
timeout 120 "$BIN" train --device cuda --dataset ptb --model savae --epochs 1 --max-train-examples 2000 \
  --valid-examples 200 --svi-steps 5 --run-dir /tmp/run-ptb --overwrite --quiet >> "$OUT/train_cuda.jsonl" 2>>"$OUT/log.txt"; echo "exit $?" | tee -a "$OUT/log.txt"
timeout 60 "$BIN" eval --device cuda --checkpoint /tmp/run-ptb/last.safetensors --max-examples 200 --iw-samples 50 --quiet >> "$OUT/eval_cuda.jsonl" 2>>"$OUT/log.txt"; echo "exit $?" | tee -a "$OUT/log.txt"
timeout 180 "$BIN" bench --device cuda --dataset ptb --k 20 --steps 10 --warmup 2 \
  --modes lm,vae,savae-implicit,savae-unrolled | tee "$OUT/bench_cuda_ptb.jsonl"
echo "exit $?" | tee -a "$OUT/log.txt"
