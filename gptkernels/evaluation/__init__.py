"""Evaluation beyond perplexity: multiple-choice benchmarks and an lm-evaluation-harness model.

- :mod:`.loglikelihood`: :func:`score_continuations`, the batched log-likelihood of continuations given
  contexts that everything here is built on.
- :mod:`.multiple_choice`: HellaSwag-style scoring (``acc``, ``acc_norm``) from the official jsonl or the hub.
- :mod:`.lm_eval_model`: ``GPTKernelsLM``, registered with lm-eval as ``gptkernels`` (imports lm-eval: load it
  only when you use lm-eval; this package does not import it).
- :mod:`.harness`: ``python -m gptkernels.evaluation.harness`` = the ``lm_eval`` command with the
  ``gptkernels`` model registered. Installed, plain ``lm_eval --model gptkernels`` works too (the entry point,
  or with lm-eval 0.4.13 the start-up hook ``_gptkernels_lm_eval``).
"""

from .loglikelihood import score_continuations
from .multiple_choice import (
    MultipleChoice,
    load_hellaswag,
    parse_task,
    run_task,
    score_multiple_choice,
)

__all__ = [
    "MultipleChoice",
    "load_hellaswag",
    "parse_task",
    "run_task",
    "score_continuations",
    "score_multiple_choice",
]
