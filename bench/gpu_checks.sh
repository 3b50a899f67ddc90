#!/usr/bin/env bash
# The GPU checks of issues 3 and 4, as one script for a lent GPU machine (no network there: the
# easy-vqa wheel travels in .whl/). Writes each bench's output to $OUT (or ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
# issue 3: vanilla (256 tokens/tile) vs compressed (64) at InternVL3-2B shapes, bf16, batch 32
timeout 240 python3 bench/compression.py --shape internvl3-2b --device cuda --batch 32 2>&1 | tee "$OUT/compression_eager.txt"
# issue 4: the judge backend against naive generate, on the GPU (8 candidates per query, then unrelated pairs)
timeout 120 python3 bench/judge_throughput.py --device cuda 2>&1 | grep -v Warning | tee "$OUT/judge_cuda.txt"
timeout 90 python3 bench/judge_throughput.py --device cuda --per-query 1 2>&1 | grep -v Warning | tee "$OUT/judge_cuda_unrelated.txt"
# issue 3: the same as the first, torch.compile'd (both settings)
timeout 330 python3 bench/compression.py --shape internvl3-2b --device cuda --batch 32 --compile 2>&1 | tee "$OUT/compression_compile.txt"
