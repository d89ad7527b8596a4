#!/bin/sh
# The GPU proof (issue #16), from any directory: see `python3 -m benchmarks.gpu_check --help`.
#   benchmarks/gpu_check.sh              # on a CUDA machine; output in $OUT, else results/gpu_check/<time>/
#   benchmarks/gpu_check.sh --cpu --out /tmp/rehearsal
cd "$(dirname "$0")/.." || exit 2
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
