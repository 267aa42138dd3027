#!/usr/bin/env bash
# The GPU checks of issue 16, as one script for a lent GPU machine (run from the repository root):
#
#   bash benchmarks/gpu_checks.sh            # the gpu-marked tests, then the default run on the GPU
#
# The machine's image has CUDA PyTorch; the project's other dependencies travel as wheels in .whl/ (see the device
# tool's README: `pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl deepspeed==0.19.8
# transformers==5.24.0 ...`). Output goes to $OUT (the device tool brings it back) or ./gpu_out.
set -uo pipefail
out="${OUT:-gpu_out}"
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi -L | tee "$out/device.txt"
python3 -c "import torch, transformers, deepspeed; print(torch.__version__, transformers.__version__, deepspeed.__version__)" \
  | tee -a "$out/device.txt"
timeout 420 python3 -m pytest -m gpu -q -p no:cacheprovider -rs tests 2>&1 | tee "$out/gpu_tests.log"
timeout 300 python3 -m training.train_rm --dtype bf16 --output_dir "$out/default_rm" 2>&1 | tail -20 \
  | tee "$out/default_run.log"
