#!/bin/sh
# The GPU check in one command from anywhere: benchmarks/gpu.sh [gpu.py options]
# (PYTHON=... picks the interpreter with the CUDA build of torch; FALKIT_DATA the data root)
cd "$(dirname "$0")/.." && PYTHONPATH=src exec "${PYTHON:-python3}" benchmarks/gpu.py "$@"
