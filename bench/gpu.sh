#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU: the matcher benchmark on CPU and CUDA, a larger
# sweep than the CPU default, JSON and PNG under ${1:-bench-results}/. Run from the repository root
# after `make test` has built .venv with a CUDA build of torch==2.13.0 installed first
# (pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126).
set -euo pipefail
out="${1:-bench-results}"
mkdir -p "$out"
py=".venv/bin/python"
"$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "CUDA is not available to torch")'
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
# CUDA-only tests first (they skip on CPU-only machines).
.venv/bin/pytest -q -m gpu
.venv/bin/fedprint bench matcher --json "$out/matcher.json" \
  --sizes 30,100,300,1000,3000 --shortlist-sizes 10000,100000,1000000 \
  --batches 1,4,16,64 --probes 32 --base 48 --device cpu --device cuda
echo "wrote $out/matcher.json and $out/matcher.png"
