"""Training as a library: ``train(TrainConfig(...)) -> TrainResult``.

::

    from gptkernels.training import TrainConfig, train

    result = train(TrainConfig(preset="tiny", max_steps=200, out_dir="out/tiny"))
    print(result.steps, result.final_val_loss, result.final_val_bpb, result.checkpoint)

``python -m gptkernels.train`` parses the command line into a :class:`TrainConfig` and calls :func:`train`;
``--trainer hf`` runs the same options through ``transformers.Trainer`` (:mod:`gptkernels.hf_trainer`).

The modules, bottom up: :mod:`.config` (options and their rules, the result), :mod:`.schedule` (learning rate,
evaluation cadence), :mod:`.runtime` (device, precision, processes, data), :mod:`.outdir` (the output folder and
its lock), :mod:`.metrics` (metrics.jsonl, W&B, console), :mod:`.resume`, :mod:`.loop` (the native loop).
"""

from __future__ import annotations

from .config import TrainConfig, TrainResult
from .loop import TrainingDiverged, TrainingInterrupted, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "TrainingInterrupted", "train"]
