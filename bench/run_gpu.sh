#!/usr/bin/env bash
# Everything a lent CUDA machine should check, in one call (see research_notes.md):
#   bench/run_gpu.sh tests   -> the CUDA tests (tests/test_gpu.py) and the kernel/control suites on CUDA
#   bench/run_gpu.sh bench   -> steer GB/s, fused log-prob loss, steered decode (eager and CUDA graphs)
#   bench/run_gpu.sh cpu-sweep -> issue 5's sweep benchmark (bench/bench_eval.py) on the host's CPU
#       cores, the default model's shapes with random weights: first write its config and tokenizer
#       here (uv run python bench/bench_eval.py --write-skeleton .device/smollm2) and carry .device/smollm2
# The machine has python3 with torch and triton but no network: wheels for the pinned
# transformers travel in .whl/ (see .library/device/README.md); the default model does not travel,
# so tests that need it are skipped (STEERKERN_TESTS_WITHOUT_DEFAULT_MODEL=1).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export STEERKERN_TESTS_WITHOUT_DEFAULT_MODEL=1 PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
PYTEST="python3 -m pytest -p no:cacheprovider -o addopts= -ra"
case "${1:-tests}" in
  tests)
    shift
    $PYTEST -q tests/test_gpu.py "$@" 2>&1 | tee "$OUT/test_gpu.log"
    ;;
  suites)
    shift
    $PYTEST -q -m "not slow" tests/test_steer_op.py tests/test_logprobs.py tests/test_loss.py tests/test_control.py tests/test_train.py "$@" 2>&1 | tee "$OUT/suites.log"
    ;;
  bench)
    shift
    $PYTEST -q -s --benchmark-only --benchmark-json="$OUT/bench-${BENCH_NAME:-run}.json" "$@" 2>&1 | tee "$OUT/bench-${BENCH_NAME:-run}.log"
    ;;
  cpu-sweep)
    shift
    CUDA_VISIBLE_DEVICES= STEERKERN_BENCH_SKELETON=${SKELETON:-.device/smollm2} \
      STEERKERN_BENCH_THREADS=${THREADS:-$(nproc)} python3 bench/bench_eval.py "${@:-3}" 2>&1 | tee "$OUT/cpu-sweep.log"
    ;;
esac
