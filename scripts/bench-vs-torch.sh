#!/usr/bin/env bash
# savae's training steps against the PyTorch reference steps of ../shared/bench, in one
# run on this machine: prints savae's and PyTorch's JSON lines, then one ratio line per
# step (savae / PyTorch, < 1 is faster) and writes them all to $OUT (default
# bench/results/vs-torch-<host>-<date>.jsonl).
#
#   scripts/bench-vs-torch.sh [mnist|ptb|all]
#
# PyTorch comes from $TORCH_PY (a python with torch), else a virtual environment made in
# /tmp/torch-ref from PyPI on first use. Run it on a quiet machine: nothing else compiling
# or training. Settings (both sides): f32, S = 1, K = 20 SGD steps, CG 20 iterations.
# MNIST: MLP 784-512-512-32 softplus, B = 100. PTB: LSTM embedding 256, hidden 256,
# latent 32, 32 sentences of 20 words. PyTorch's CG stops once max_b ‖r_b‖ < 1e-6: on PTB
# after 6–7 of its 20 iterations, on MNIST mostly never (its residual turns NaN and the
# test fails), so savae's implicit step is timed twice: all 20 iterations (tolerance 0)
# and with the reference's rule (relative tolerance 1e-6, each example stopping on its
# own); the ratio lines carry `cg_tol` and the mean iterations, and the fair one is the
# one whose iterations match PyTorch's.
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-mnist}
BIN=${SAVAE_BIN:-target/release/savae}
SHARED=$(realpath "${SHARED:-../shared}")
OUT=${OUT:-bench/results/vs-torch-$(hostname)-$(date +%Y-%m-%d).jsonl}
STEPS=${STEPS:-10}
[ -x "$BIN" ] || cargo build --release
PY=${TORCH_PY:-/tmp/torch-ref/bin/python}
if ! "$PY" -c "import torch" 2>/dev/null; then
  python3 -m venv /tmp/torch-ref
  /tmp/torch-ref/bin/pip install -q torch numpy
  PY=/tmp/torch-ref/bin/python
fi
TMP=$(mktemp -d)
# What was measured is kept even if a later part fails.
trap 'cat "$TMP"/*.jsonl >> "$OUT" 2>/dev/null; rm -rf "$TMP"' EXIT
machine=$(printf '{"kind":"machine","host":"%s","cpus":%s,"cpu":"%s","date":"%s","savae_commit":"%s","torch":"%s","torch_threads":%s}' \
  "$(hostname)" "$(nproc)" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')" \
  "$(date -u +%FT%TZ)" "$(git rev-parse --short HEAD)" \
  "$("$PY" -c 'import torch; print(torch.__version__)')" "$("$PY" -c 'import torch; print(torch.get_num_threads())')")
echo "$machine" | tee "$OUT"
if [ "$WHAT" = mnist ] || [ "$WHAT" = all ]; then
  "$BIN" bench --device cpu --modes vae,vae-svi,savae-unrolled,savae-implicit --k 20 --batch 100 \
    --cg-iters 20 --steps "$STEPS" --passes analytic,autograd | tee "$TMP/savae-mnist.jsonl"
  "$BIN" bench --device cpu --modes savae-implicit --k 20 --batch 100 --cg-iters 20 --cg-tol 1e-6 \
    --steps "$STEPS" --passes analytic | tee -a "$TMP/savae-mnist.jsonl"
  "$PY" "$SHARED/bench/torch_savae.py" --data "$SHARED/data/mnist" --batches 100 --ks 20 --cg 20 \
    --modes vae,svi_only,unrolled,implicit | tee "$TMP/torch-mnist.jsonl"
fi
if [ "$WHAT" = ptb ] || [ "$WHAT" = all ]; then
  "$BIN" bench --device cpu --dataset ptb --modes vae,savae-unrolled,savae-implicit --k 20 \
    --cg-iters 20 --steps 3 --warmup 1 --passes analytic | tee "$TMP/savae-ptb.jsonl"
  "$BIN" bench --device cpu --dataset ptb --modes savae-implicit --k 20 --cg-iters 20 \
    --cg-tol 1e-6 --steps 3 --warmup 1 --passes analytic | tee -a "$TMP/savae-ptb.jsonl"
  (cd "$SHARED/bench" && "$PY" torch_text_savae.py --data "$SHARED/data/ptb" \
    --configs ptb:256:256:32 --ks 20 --cg 20 --modes vae,unrolled,implicit --steps 3) \
    | tee "$TMP/torch-ptb.jsonl"
fi
python3 - "$TMP" > "$TMP/ratios.jsonl" <<'PY'
import json, pathlib, sys
tmp = pathlib.Path(sys.argv[1])
torch_name = {"vae": "vae", "vae-svi": "svi_only", "savae-unrolled": "unrolled", "savae-implicit": "implicit"}
for data in ("mnist", "ptb"):
    s, t = tmp / f"savae-{data}.jsonl", tmp / f"torch-{data}.jsonl"
    if not (s.exists() and t.exists()):
        continue
    ref = {}
    for line in t.read_text().splitlines():
        v = json.loads(line)
        if "mode" in v and "median_step_ms" in v:
            ref[v["mode"]] = v["median_step_ms"]
    for line in s.read_text().splitlines():
        v = json.loads(line)
        m = torch_name.get(v["mode"])
        if m in ref:
            print(json.dumps({"kind": "ratio", "data": data, "mode": v["mode"], "passes": v.get("passes"),
                              "k": v.get("k"), "cg_tol": v.get("cg_tol"), "cg_iters_mean": v.get("cg_iters_mean"),
                              "savae_ms": round(v["median_ms"], 2), "torch_ms": ref[m],
                              "savae_over_torch": round(v["median_ms"] / ref[m], 3),
                              "savae_peak_mib": round(v["peak_mem_mib"], 1)}))
PY
cat "$TMP/ratios.jsonl"
