#!/usr/bin/env bash
# Compile every CUDA source for sm_80 and sm_90 with warnings as errors
# (nvcc's own and the host compiler's -Wall -Wextra). Runs only the compiler:
# there is no GPU on CI. Usage: .ci/compile_cuda.sh [nvcc]
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${1:-nvcc}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
pids=()
for src in csrc/cuda/*.cu; do
  name=$(basename "$src" .cu)
  # One nvcc per source, two at a time (CI has 2 cores).
  "$NVCC" -std=c++17 -O3 -Icsrc -c "$src" -o "$out/$name.o" \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror >"$out/$name.log" 2>&1 &
  pids+=("$!:$name")
  if (( ${#pids[@]} >= 2 )); then
    p=${pids[0]}; pids=("${pids[@]:1}")
    if ! wait "${p%%:*}"; then echo "nvcc failed: ${p#*:}.cu"; cat "$out/${p#*:}.log"; status=1; fi
  fi
done
for p in "${pids[@]}"; do
  if ! wait "${p%%:*}"; then echo "nvcc failed: ${p#*:}.cu"; cat "$out/${p#*:}.log"; status=1; fi
done
[ $status -eq 0 ] && echo "CUDA sources compile for sm_80 and sm_90 without warnings: $(ls csrc/cuda/*.cu | xargs -n1 basename | tr '\n' ' ')"
exit $status
