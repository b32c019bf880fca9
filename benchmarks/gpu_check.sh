#!/usr/bin/env bash
# The GPU figures in one run on the device machine (CUDA, no package registry, its own torch
# and transformers): the CUDA tests (eager and compiled executors), then forward speed,
# generation and hot paths of `las` T = 14, eager and compiled, on a SmolLM2-shaped Llama with
# random weights. Logs and JSON go to $OUT (default /tmp/gpu). Each step has a time limit, so
# one slow step leaves the others their figures. torch.compile of the 30-block model took over
# 150 s per graph on an H200 (forward at two lengths, a decoding step per batch size): where
# device time is short, LAYERS=6 keeps the per-block ratios with a fifth of the graph to compile.
#   bash benchmarks/gpu_check.sh
#   LAYERS=6 bash benchmarks/gpu_check.sh
set -o pipefail
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/gpu} LAYERS=${LAYERS:-30}
mkdir -p "$OUT"
# snncc as its installed layout (snncc.passes = passes/, snncc.backends = backends/) without pip.
shim=$(mktemp -d)
cp -r snncc "$shim/snncc" && cp -r passes "$shim/snncc/passes" && cp -r backends "$shim/snncc/backends"
export PYTHONPATH="$shim:benchmarks"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/versions.log"
PYTHONPATH="$PYTHONPATH:$PWD" timeout "${TESTS_S:-100}" python3 -P -m pytest -q -p no:cacheprovider -m "" \
    tests/test_cuda.py "tests/backends/test_compiled.py::test_multi_range_quantizer_compiled_equals_eager" \
    "tests/backends/test_compiled.py::test_table_neurons_and_normalisers_compiled_equal_eager" 2>&1 | tee "$OUT/test_cuda.log"
timeout "${SPEED_S:-190}" python3 benchmarks/executor_speed.py --model smollm2-shaped --layers "$LAYERS" --device cuda --passes las -T 14 \
    --tokens 128 512 --modes fused compiled --repeats 5 --out "$OUT" 2>&1 | tee "$OUT/executor_speed.log"
timeout "${GENERATION_S:-200}" python3 benchmarks/generation.py --model smollm2-shaped --layers "$LAYERS" --device cuda --new-tokens 32 \
    --calib-tokens 1024 --modes fused compiled --uncached-modes --batch 1 8 --out "$OUT" 2>&1 \
    | tee "$OUT/generation.log"
timeout "${HOT_S:-70}" python3 benchmarks/hot_paths.py --model smollm2-shaped --layers "$LAYERS" --device cuda -T 14 --tokens 128 \
    --modes fused compiled --out "$OUT" 2>&1 | tee "$OUT/hot_paths.log"
