"""Multiple-choice benchmarks (HellaSwag, PIQA, ARC style): pick the ending the model finds most likely.

Each :class:`MultipleChoice` is a context, its endings and the index of the right one. Every ending is scored
by the log-likelihood of ``" " + ending`` after the context (:func:`score_continuations`, batched), and two
accuracies are reported, with lm-evaluation-harness's names and definitions:

- ``acc``: the ending with the highest summed log-likelihood is the right one;
- ``acc_norm``: the same after dividing each sum by the ending's length in characters (lm-eval's ``acc_norm``,
  which removes the bias towards short endings); ``acc_bytes`` divides by its UTF-8 bytes instead (equal to
  ``acc_norm`` on ASCII text such as HellaSwag's).

Context and ending are tokenized as lm-eval does for causal models (``TemplateLM._encode_pair``): the text
``context + " " + ending`` is encoded whole and the ending is what follows the context's own tokens, so the
numbers match ``lm_eval --tasks hellaswag`` on the same model and documents.

HellaSwag's official jsonl (fields ``ctx_a``, ``ctx_b``, ``activity_label``, ``endings``, ``label``) and ARC's
(``question.stem``, ``question.choices``, ``answerKey``) are read from a local file or from the Hugging Face hub
(``hf:Rowan/hellaswag``, ``hf:allenai/ai2_arc:ARC-Easy``) with lm-eval's preprocessing and prompts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..tokenizer import encode_ordinary
from .loglikelihood import score_continuations

HELLASWAG_HF = "hf:Rowan/hellaswag"


@dataclass
class MultipleChoice:
    context: str  # the text every ending continues
    endings: list[str]  # the candidate continuations, without the separating space
    label: int  # index of the right ending


# ---------------------------------------------------------------------------------------------------------------
# HellaSwag
def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up: WikiHow's ``[title]`` becomes a sentence end, other ``[...]`` go."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_example(doc: dict[str, Any]) -> MultipleChoice:
    """One official HellaSwag record as a :class:`MultipleChoice` (lm-eval's ``process_docs``)."""
    missing = [k for k in ("activity_label", "ctx_a", "ctx_b", "endings", "label") if k not in doc]
    if missing:
        raise ValueError(f"not a HellaSwag record: missing {', '.join(missing)}")
    if doc["label"] in ("", None):
        raise ValueError("HellaSwag record without a label (the test split has none; use validation)")
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    endings = [hellaswag_preprocess(e) for e in doc["endings"]]
    label = int(doc["label"])
    if not 0 <= label < len(endings):
        raise ValueError(f"HellaSwag label {label} is not the index of one of the {len(endings)} endings")
    return MultipleChoice(hellaswag_preprocess(doc["activity_label"] + ": " + ctx), endings, label)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a jsonl file (blank lines skipped); a bad line is an error naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such jsonl file: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON: {e}") from None
    return records


def load_hellaswag(source: str = HELLASWAG_HF, limit: int | None = None) -> list[MultipleChoice]:
    """HellaSwag examples from a local jsonl file or ``hf:NAME[:CONFIG]`` (its validation split).

    Args:
        source: a path to the official jsonl (``hellaswag_val.jsonl``), or ``hf:Rowan/hellaswag`` (needs the
            network or the datasets cache).
        limit: only the first ``limit`` examples.
    """
    return _load(source, limit, hellaswag_example, "validation", "HellaSwag")


# ---------------------------------------------------------------------------------------------------------------
# ARC (AI2 Reasoning Challenge)
def arc_example(doc: dict[str, Any]) -> MultipleChoice:
    """One ARC question, from the official jsonl (``question: {stem, choices: [{text, label}]}``) or the hub's
    ``allenai/ai2_arc`` (``question: str, choices: {text: [...], label: [...]}``), with lm-eval's prompt."""
    try:
        q = doc["question"]
        stem, choices = (q["stem"], q["choices"]) if isinstance(q, dict) else (q, doc["choices"])
        if isinstance(choices, dict):
            texts, labels = list(choices["text"]), list(choices["label"])
        else:
            texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
        key = doc["answerKey"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"not an ARC record: missing {e}") from None
    if key not in labels:
        raise ValueError(f"ARC answerKey {key!r} is not one of the choice labels {labels}")
    return MultipleChoice(f"Question: {stem}\nAnswer:", texts, labels.index(key))


def load_arc(source: str, limit: int | None = None) -> list[MultipleChoice]:
    """ARC questions from a local jsonl (``ARC-Easy-Test.jsonl``) or ``hf:allenai/ai2_arc:ARC-Easy`` (test split)."""
    return _load(source, limit, arc_example, "test", "ARC")


def _load(
    source: str, limit: int | None, to_example: Callable[[dict[str, Any]], MultipleChoice], split: str, kind: str
) -> list[MultipleChoice]:
    if source.startswith("hf:"):  # hf:NAME[:CONFIG], as the data sources
        name, _, config = source[3:].partition(":")
        from datasets import load_dataset

        docs: Iterable[dict[str, Any]] = load_dataset(name, config or None, split=split)
    else:
        docs = read_jsonl(source)
    examples = []
    for n, doc in enumerate(docs, 1):
        if limit is not None and len(examples) >= limit:
            break
        try:
            examples.append(to_example(doc))
        except ValueError as e:
            raise ValueError(f"{source}: record {n}: {e}") from None
    if not examples:
        raise ValueError(f"{source}: no {kind} records")
    return examples


# ---------------------------------------------------------------------------------------------------------------
# Scoring
def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` after it, split as lm-eval splits them.

    Trailing spaces move from the context to the continuation; ``context + continuation`` is encoded whole and
    the continuation is what follows the context's own tokens. An empty context becomes the end-of-text token.
    """
    if not context:
        return [tokenizer.eot_token], encode_ordinary(tokenizer, continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode_ordinary(tokenizer, context + continuation)
    context_ids = encode_ordinary(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def score_multiple_choice(
    model: torch.nn.Module,
    tokenizer: Any,
    examples: Sequence[MultipleChoice],
    *,
    batch_size: int = 16,
    device: Any = None,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Accuracy of ``model`` on multiple-choice ``examples``.

    Args:
        model: a :class:`gptkernels.GPT`.
        tokenizer: its tokenizer.
        examples: the questions; each ending is scored as ``" " + ending`` after the context.
        batch_size: (context, ending) sequences per forward pass.
        device, autocast_dtype, progress: as in :func:`score_continuations`.
    Returns:
        ``{"acc", "acc_norm", "acc_bytes", "n", "loglikelihoods"}``: the three accuracies (fractions), the
        number of examples and every ending's summed log-likelihood (nats), one list per example.
    """
    if not examples:
        raise ValueError("no multiple-choice examples to score")
    requests = [encode_pair(tokenizer, ex.context, " " + e) for ex in examples for e in ex.endings]
    scores = score_continuations(
        model, requests, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype, progress=progress
    )
    correct = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    lls: list[list[float]] = []
    k = 0
    for ex in examples:
        ll = [s for s, _ in scores[k : k + len(ex.endings)]]
        k += len(ex.endings)
        lls.append(ll)
        chars = [max(len(e), 1) for e in ex.endings]
        n_bytes = [max(len(e.encode("utf-8")), 1) for e in ex.endings]
        correct["acc"] += _argmax(ll) == ex.label
        correct["acc_norm"] += _argmax([a / c for a, c in zip(ll, chars)]) == ex.label
        correct["acc_bytes"] += _argmax([a / b for a, b in zip(ll, n_bytes)]) == ex.label
    n = len(examples)
    return {**{k: v / n for k, v in correct.items()}, "n": n, "loglikelihoods": lls}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # ties: the first, as numpy.argmax


# ---------------------------------------------------------------------------------------------------------------
# Named tasks (evaluate --task NAME=SOURCE)
TASKS: dict[str, tuple[Callable[..., list[MultipleChoice]], str]] = {  # name: (loader, default source)
    "hellaswag": (load_hellaswag, HELLASWAG_HF),
    "arc_easy": (load_arc, "hf:allenai/ai2_arc:ARC-Easy"),
    "arc_challenge": (load_arc, "hf:allenai/ai2_arc:ARC-Challenge"),
}


def parse_task(spec: str) -> tuple[str, str]:
    """``"hellaswag=path.jsonl"`` → ``("hellaswag", "path.jsonl")``; a bare name takes its default source."""
    name, sep, source = spec.partition("=")
    name = name.strip()
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)} (as NAME or NAME=FILE)")
    if sep and not source:
        raise ValueError(f"task {spec!r}: give a source after '=' (a jsonl file or hf:NAME)")
    return name, source if sep else TASKS[name][1]


def run_task(
    spec: str, model: torch.nn.Module, tokenizer: Any, *, limit: int | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Load and score one task given as ``NAME`` or ``NAME=SOURCE``; returns :func:`score_multiple_choice`'s
    result plus ``task`` and ``source``."""
    name, source = parse_task(spec)
    loader, _ = TASKS[name]
    result = score_multiple_choice(model, tokenizer, loader(source, limit=limit), **kwargs)
    return {"task": name, "source": source, **result}


__all__ = [
    "HELLASWAG_HF",
    "TASKS",
    "MultipleChoice",
    "arc_example",
    "encode_pair",
    "hellaswag_example",
    "hellaswag_preprocess",
    "load_arc",
    "load_hellaswag",
    "parse_task",
    "read_jsonl",
    "run_task",
    "score_multiple_choice",
]
