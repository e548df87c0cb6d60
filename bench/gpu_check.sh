#!/usr/bin/env bash
# One prepared check of the GPU paths, printed and written as JSON (bench/gpu_check.py says what it checks).
#   bash bench/gpu_check.sh [--out DIR]             on a machine with a CUDA GPU, about 8 minutes
#   bash bench/gpu_check.sh --dry-run [--out DIR]   the same parts on the CPU with tiny shapes
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} PYTHONPATH=.:bench${PYTHONPATH:+:$PYTHONPATH}
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
