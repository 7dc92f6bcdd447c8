#!/usr/bin/env bash
# Build the `savae` binary with CUDA support on a machine without a GPU.
#
#   scripts/build-cuda.sh            # compute capability 90 (H100/H200)
#   CUDA_COMPUTE_CAP=80 scripts/build-cuda.sh
#
# 1. Installs the CUDA 13.0 compiler and headers from PyPI into a local virtual environment
#    (.cuda/, pinned: nvcc must not be newer than the GPU driver's CUDA version; 13.0 runs
#    on driver 580).
# 2. candle-core turns on cudarc's `dynamic-linking`, so the link needs libcuda, libcublas,
#    libcublasLt, libcurand and libnvrtc. Instead of downloading ~1 GB of libraries, it links
#    against small stub libraries with the real SONAMEs (built here from cudarc's list of
#    functions); at run time the dynamic loader binds the real ones. libcudart is linked
#    statically (a linker script pointing at libcudart_static.a).
# 3. Builds target/cuda/release/savae and prints what it needs at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
CAP=${CUDA_COMPUTE_CAP:-90}
VENV=${SAVAE_CUDA_VENV:-.cuda}
if [ ! -x "$VENV/bin/nvcc" ] && ! ls "$VENV"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
fi
CU=$(cd "$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13 | head -1)" && pwd)
export PATH=$CU/bin:$PATH CUDA_ROOT=$CU CUDA_HOME=$CU CUDA_PATH=$CU CUDA_COMPUTE_CAP=$CAP
nvcc --version | tail -2

STUBS=$PWD/target/cuda-stubs
mkdir -p "$STUBS"
printf 'INPUT(%s/lib/libcudart_static.a)\n' "$CU" > "$STUBS/libcudart.so"
cargo fetch -q
CUDARC=$(python3 - <<'PY'
import json, subprocess
meta = json.loads(subprocess.check_output(["cargo", "metadata", "--format-version", "1", "--features", "savae-cli/cuda"]))
paths = [p["manifest_path"] for p in meta["packages"] if p["name"] == "cudarc"]
print(paths[0].rsplit("/", 1)[0])
PY
)
grep -rhoE "\bfn (cu|nvrtc|curand|cublas)[A-Za-z0-9_]*" "$CUDARC/src" | sed 's/^fn //' | sort -u > "$STUBS/symbols.txt"
# One stub per library, each with that library's functions, so that every one is NEEDED.
stub() { # name soname pattern [exclude]
  grep -E "$3" "$STUBS/symbols.txt" | { if [ -n "${4:-}" ]; then grep -vE "$4"; else cat; fi; } \
    | sed 's/.*/void &(void) {}/' > "$STUBS/$1.c"
  gcc -shared -fPIC -o "$STUBS/lib$1.so" -Wl,-soname,"$2" "$STUBS/$1.c"
}
stub cublasLt libcublasLt.so.13 '^cublasLt'
stub cublas libcublas.so.13 '^cublas' '^cublasLt'
stub curand libcurand.so.10 '^curand'
stub nvrtc libnvrtc.so.13 '^nvrtc'
stub cuda libcuda.so.1 '^cu' '^(cublas|curand)'
export LIBRARY_PATH=$STUBS
cargo build --release --features cuda -p savae-cli --target-dir target/cuda
BIN=$PWD/target/cuda/release/savae
echo
echo "built $BIN (compute capability $CAP)"
echo "it needs at run time (NEEDED):"
readelf -d "$BIN" | grep NEEDED | sed 's/.*\[\(.*\)\]/  \1/'
cat <<TXT
On the GPU machine: the driver's libcuda.so.1 and CUDA 13 cuBLAS, cuBLASLt, cuRAND and NVRTC
(e.g. the pip packages nvidia-cublas, nvidia-curand, nvidia-cuda-nvrtc), on LD_LIBRARY_PATH:
  export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:/path/to/site-packages/nvidia/cu13/lib
  $BIN train --device cuda
Do not put /usr/local/cuda-13.0/compat on LD_LIBRARY_PATH (its libcuda.so.1 fails with
CUDA_ERROR_SYSTEM_DRIVER_MISMATCH).
TXT
