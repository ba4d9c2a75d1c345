#!/usr/bin/env bash
# Builds tools/lora_gemm_probe.cu with nvcc (the CUTLASS / CuTe headers of the mlx-cuda
# wheel, cuBLAS / cuBLASLt of the nvidia-cublas wheel) and runs it:
#   tools/lora_gemm_probe.sh ["M N K reps bias w_nmajor"]...
set -euo pipefail
py=${PYTHON:-python3}
mlx_inc=$($py -c "import mlx; print(list(mlx.__path__)[0] + '/include')")
nv=$($py -c "import nvidia; print(list(nvidia.__path__)[0])")
cub=$(dirname "$(find "$nv" -name 'libcublas.so*' | head -1)")
cubinc=$(dirname "$(find "$nv" -name 'cublas_v2.h' | head -1)")
out=${PROBE_BIN:-/tmp/lora_gemm_probe}
${NVCC:-nvcc} -O3 -std=c++20 -arch=sm_90a -Icsrc -I"$mlx_inc" -I"$cubinc" ${NVCC_FLAGS:-} \
  -o "$out" tools/lora_gemm_probe.cu -L"$cub" -l:$(basename "$(ls "$cub"/libcublas.so.* | head -1)") \
  -l:$(basename "$(ls "$cub"/libcublasLt.so.* | head -1)") \
  -Xlinker -rpath="$cub"
if [ $# -eq 0 ]; then set -- "4096 4096 4096 50 0"; fi
for args in "$@"; do "$out" $args; done
