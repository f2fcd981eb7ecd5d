"""A gptkernels checkpoint as an lm-evaluation-harness model, so every lm-eval task runs on it.

::

    lm_eval --model gptkernels --model_args checkpoint=out --tasks hellaswag
    python -m gptkernels.evaluation.harness --model gptkernels --model_args checkpoint=out --tasks hellaswag

The class subclasses lm-eval's ``TemplateLM`` (as its ``hf`` model does), so requests are tokenized the same way
(``_encode_pair``, the end-of-text token as the context of an empty one, the same rolling windows), and the
log-likelihoods equal the ``hf`` model's on the same weights (``GPT.save_hf``). Importing this module imports
lm-eval and registers the model as ``gptkernels``. The plain ``lm_eval`` command finds it without that import:
lm-eval releases with plugin discovery through the package's ``lm_eval.models`` entry point, lm-eval 0.4.13 and
earlier through the start-up hook that installs put in site-packages (``_gptkernels_lm_eval``, a .pth file).

``--model_args``: ``checkpoint`` (a checkpoint file or training output folder, required), ``device`` (auto),
``batch_size`` (16), ``kernels`` (auto, triton, torch), ``dtype`` (fp32, bf16, fp16: autocast),
``max_gen_toks`` (256), ``seed`` (0: sampling in ``generate_until`` when a task asks for it). From Python,
``GPTKernelsLM(model=gpt, tokenizer=tok)`` wraps a model in memory (``lm_eval.simple_evaluate(model=...)``).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from ..checkpoint import load_checkpoint, model_from_state, tokenizer_from_state
from ..cli import resolve_device
from ..generation import generate_tokens
from ..tokenizer import encode_ordinary
from .loglikelihood import score_continuations

log = logging.getLogger(__name__)
_DTYPES = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16}


@register_model("gptkernels")
class GPTKernelsLM(TemplateLM):
    """lm-eval's ``LM`` interface over a :class:`gptkernels.GPT` and its tokenizer."""

    def __init__(
        self,
        checkpoint: str | None = None,
        device: str | None = None,
        batch_size: int | str = 16,
        kernels: str | None = None,
        dtype: str = "fp32",
        max_gen_toks: int = 256,
        seed: int = 0,
        max_batch_size: int | None = None,  # lm-eval passes it to every model; batches are fixed here
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"gptkernels model: unknown model_args {sorted(kwargs)}")
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line defaults to cuda:0; like its hf model, run on the CPU when there is no GPU
            log.warning("gptkernels model: device %s requested but CUDA is not available; using the CPU", device)
            device = "cpu"
        self._device = resolve_device(device)
        if model is not None:  # an in-memory model (notebooks, tests): pass its tokenizer too
            if tokenizer is None:
                raise ValueError("gptkernels model: pass tokenizer= with model=")
            self.model, self.tokenizer = model.to(self._device).eval(), tokenizer
        else:
            if tokenizer is not None:
                raise ValueError("gptkernels model: tokenizer= goes with model=; a checkpoint brings its own")
            if checkpoint is None:
                raise ValueError("gptkernels model: give model_args checkpoint=<checkpoint file or output folder>")
            state = load_checkpoint(checkpoint)
            self.model = model_from_state(state, device=self._device, kernels=kernels)
            self.tokenizer = tokenizer_from_state(state)
        if batch_size == "auto" or str(batch_size).startswith("auto"):
            batch_size = 16  # no search for the largest batch: a fixed, memory-safe default
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"gptkernels model: batch_size must be a positive integer, got {batch_size}")
        if dtype not in _DTYPES:
            raise ValueError(f"gptkernels model: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.autocast_dtype = _DTYPES[dtype]
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)

    # ---- what TemplateLM needs ------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eot_token)

    @property
    def max_length(self) -> int:
        return int(self.model.config.context_length)

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name", type(self.tokenizer).__name__)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return encode_ordinary(self.tokenizer, string)  # GPT-2 style: no BOS, special-token text is text

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="gptkernels loglikelihood")
        results = score_continuations(
            self.model,
            [(ctx, cont) for _, ctx, cont in requests],
            batch_size=self.batch_size,
            device=self._device,
            autocast_dtype=self.autocast_dtype,
            progress=lambda done, total: bar.update(done - bar.n),
        )
        bar.close()
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: disjoint windows of ``max_length`` tokens, each token scored once,
        the first after the end-of-text token (lm-eval's rolling windows, as its ``hf`` model)."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            token_windows = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for w in map(lm_utils.make_disjoint_window, token_windows):
                windows.append((None, *w))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, scores):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continue each context until a stop string, the end-of-text token or ``max_gen_toks`` tokens.

        Requests with the same generation options and the same prompt length run as one batch (up to
        ``batch_size``) through :func:`gptkernels.generation.generate_tokens` with its KV cache; the model
        has no padding mask, so prompts of different lengths are never mixed in a batch.
        """
        eos = self.tok_decode([self.eot_token_id])
        groups: dict[tuple[str, int], list[tuple[int, list[int]]]] = defaultdict(list)
        options: dict[str, dict[str, Any]] = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            key = json.dumps(kw, sort_keys=True, default=str)
            options[key] = kw
            keep = max(1, self.max_length - int(kw["max_gen_toks"]))  # room for the new tokens, as hf does
            ids = self.tok_encode(context)[-keep:] or [self.prefix_token_id]
            groups[(key, len(ids))].append((i, ids))
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="gptkernels generate_until")
        for (key, _), members in sorted(groups.items(), key=lambda kv: -kv[0][1]):
            kw = dict(options[key])
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                texts = self._generate_batch([ids for _, ids in batch], until, kw)
                for (i, _), text in zip(batch, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return out

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], until: list[str], kw: dict[str, Any]) -> list[str]:
        idx = torch.tensor(prompts, dtype=torch.long, device=self._device)  # (B, T): same length
        temperature = float(kw.get("temperature", 0.0)) if kw.get("do_sample") else 0.0
        top_k, top_p = kw.get("top_k"), kw.get("top_p")
        new: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        steps = generate_tokens(
            self.model,
            idx,
            int(kw["max_gen_toks"]),
            temperature=temperature,
            top_k=int(top_k) if top_k else None,
            top_p=float(top_p) if top_p and float(top_p) < 1.0 else None,
            seed=self.seed if temperature > 0 else None,
            eos_token=self.eot_token_id,
        )
        for col in steps:
            for r, t in enumerate(col.tolist()):
                if done[r]:
                    continue
                if t == self.eot_token_id:
                    done[r] = True
                    continue
                new[r].append(t)
                if any(s and s in self.tok_decode(new[r]) for s in until):
                    done[r] = True
            if all(done):
                steps.close()
                break
        return [postprocess_generated_text(self.tok_decode(ids), stop=until, think_end_token=None) for ids in new]

    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": self.model.num_params(), "model_dtype": str(self.autocast_dtype or "fp32")}


__all__ = ["GPTKernelsLM"]
