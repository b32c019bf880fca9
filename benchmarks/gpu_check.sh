#!/usr/bin/env bash
# The GPU figures of issue 8 in one run on the device machine (CUDA, no package registry, its
# own torch and transformers): the CUDA tests, then executor speed, generation and hot paths
# on a SmolLM2-shaped Llama with random weights. Logs and JSON go to $OUT (default /tmp/gpu).
#   bash benchmarks/gpu_check.sh
set -o pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/gpu}
mkdir -p "$OUT"
# snncc as its installed layout (snncc.passes = passes/, snncc.backends = backends/) without pip.
shim=$(mktemp -d)
cp -r snncc "$shim/snncc" && cp -r passes "$shim/snncc/passes" && cp -r backends "$shim/snncc/backends"
export PYTHONPATH="$shim:benchmarks"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
PYTHONPATH="$PYTHONPATH:$PWD" python3 -P -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
python3 benchmarks/executor_speed.py --model smollm2-shaped --device cuda -T 16 --tokens 128 512 --repeats 5 \
    --out "$OUT" 2>&1 | tee "$OUT/executor_speed.log"
python3 benchmarks/generation.py --model smollm2-shaped --device cuda --new-tokens 32 --calib-tokens 1024 \
    --out "$OUT" 2>&1 | tee "$OUT/generation.log"
python3 benchmarks/hot_paths.py --model smollm2-shaped --device cuda -T 16 --tokens 128 --out "$OUT" 2>&1 \
    | tee "$OUT/hot_paths.log"
