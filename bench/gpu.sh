#!/usr/bin/env bash
# One command on a machine with an NVIDIA GPU: the matcher benchmark on CPU and CUDA (a larger
# sweep than the CPU default), the batching and two-tier benchmarks on CUDA; JSON and PNG under
# ${1:-bench-results}/. Run from the repository root after `make test` has built .venv with a
# CUDA build of torch==2.13.0 installed first (pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126).
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
# Plain LSS beside the default LSS-R: the roofline fraction of the matrix-product kernel alone.
.venv/bin/fedprint bench matcher --json "$out/matcher_lss.json" --consolidation lss \
  --sizes 30,100,300,1000,3000 --shortlist-sizes 10000 --batches 1,4,16,64 --probes 32 --base 48 \
  --device cuda
# One node on the GPU under concurrent Identify calls, unbatched against micro-batched.
.venv/bin/fedprint bench batching --json "$out/batching.json" --persons 600 --requests 128 --concurrency 32
# The two tiers on a 20,000-subject realistic gallery (encoding runs on the GPU too).
.venv/bin/fedprint synth "$out/s20k" --subjects 20000 --difficulty realistic --seed 1 --no-population
.venv/bin/fedprint bench shortlist "$out/s20k/evaluation" --json "$out/shortlist.json" \
  --workdir "$out/s20k-gallery" --device cuda
echo "wrote $out/{matcher,matcher_lss,batching,shortlist}.json and $out/matcher.png"
