#!/bin/sh
# The checks a CPU machine cannot make, for a GPU machine lent through the device tool: CUDA
# against CPU (tests/inference/test_cuda.py) and the GPU timings of bench/inference.py for 40
# and 500 slices. The GPU image has PyTorch, NumPy, Pillow, tqdm, matplotlib and pytest, but no
# pydicom: carry its wheel. Once, here, in the repository root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl pydicom==3.0.2
#
# then run `sh bench/cuda_check.sh` there with carry [".whl"] and a timeout of about 400 s
# (it needs about 3-5 minutes). Everything it prints is also written under $OUT.
set -eu
OUT=${OUT:-/tmp/cuda-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' \
  | tee -a "$OUT/gpu.txt"
# the project's pytest settings name pytest-django, which is not there: the CUDA tests need none
python3 -m pytest -p no:cacheprovider --noconftest -o addopts="" -q -rs \
  tests/inference/test_cuda.py 2>&1 | tee "$OUT/cuda-tests.txt" || true
python3 bench/inference.py --device cuda --slices 40 --repeat 5 2>&1 | tee "$OUT/bench-40.txt"
python3 bench/inference.py --device cuda --slices 500 --repeat 2 2>&1 | tee "$OUT/bench-500.txt"
