#!/usr/bin/env bash
# The GPU check in one command (issue 17): at most 8 minutes on one GPU. It runs
#   1. the test suite with D3SR_TEST_DEVICE=cuda (tests that take the `device` fixture use it; the rest run on the CPU),
#   2. d3sr bench --arch sd21 --device cuda, ours in bf16 and in fp16 against the fp16 reference, 512 and 2048 px out,
#   3. the peak GPU memory of both paths at a 4096 px output (bf16),
#   4. one tiny training run of each one-step method with mixed precision (bf16),
# and writes gpu_check.json (every step: command, exit status, wall and CPU seconds, its report) and gpu_check.md
# (the table) into benchmarks/ (or --out DIR). The steps and their sizes are in benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh             # on a machine with a CUDA GPU: every step its own process, with a time limit
#   benchmarks/gpu_check.sh --dry-run   # the same steps on the CPU: tiny models, small sizes, fp32, the d3sr commands
#                                       # inside one process (CI runs it; tests/test_gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
