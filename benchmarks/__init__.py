"""gptkernels' benchmark suite: ``pytest benchmarks/ --benchmark-only`` and ``python -m benchmarks.report``.

CUDA cases skip with a reason on a machine without a GPU; CPU cases (sampling, tokenizer, generation, a tiny
training step) always run. ``bash benchmarks/gpu_check.sh`` is the one command for a GPU machine.
"""
