"""``python -m gptkernels.evaluation.harness ARGS``: the ``lm_eval`` command with the ``gptkernels`` model.

lm-eval 0.4.13 (and earlier) finds models only in its own source tree: no entry points, no plugin option, and
``--include_path`` adds tasks, not models. An install of gptkernels makes the plain ``lm_eval --model gptkernels``
work anyway, through a start-up hook (``_gptkernels_lm_eval``, imported by a .pth file in site-packages); this
command needs no hook, e.g. from a checkout on PYTHONPATH or an install made before the hook existed. It runs
lm-eval's own command line after registering
:class:`~gptkernels.evaluation.lm_eval_model.GPTKernelsLM`, so every argument means what it means to
``lm_eval``::

    python -m gptkernels.evaluation.harness --model gptkernels --model_args checkpoint=out \\
        --tasks hellaswag --limit 100 --batch_size 32

lm-eval releases with plugin discovery (the ``lm_eval.models`` entry point group) find the model through
gptkernels' installed entry point instead of the hook.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    from . import lm_eval_model  # noqa: F401 (registers the "gptkernels" model)

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
