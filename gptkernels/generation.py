"""Autoregressive generation with a KV cache, and a text-level helper."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from .sampling import check_sampled, sample

if TYPE_CHECKING:
    from .model import GPT


def check_vocab(model: GPT, tokenizer: Any) -> None:
    """``ValueError`` when ``tokenizer`` can produce ids that ``model`` has no embedding for (a model whose
    vocabulary is smaller than the tokenizer's), instead of an IndexError in the middle of a forward pass."""
    n_model, n_tok = model.config.vocab_size, getattr(tokenizer, "n_vocab", None)
    if n_tok is not None and n_tok > n_model:
        name = getattr(tokenizer, "name", type(tokenizer).__name__)
        raise ValueError(
            f"the model's vocabulary ({n_model:,} tokens) is smaller than the {name} tokenizer's ({n_tok:,}): "
            "ids past it have no embedding; use the tokenizer the model was trained with"
        )


def check_kernels(kernels: str, device: Any) -> None:
    """``ValueError`` with the one-line reason when ``kernels="triton"`` cannot run on ``device`` (a CPU without
    Triton's interpreter), instead of an error from inside the first kernel launch."""
    if kernels != "triton":
        return
    from .ops import why_not_triton

    reason = why_not_triton(torch.device(device))
    if reason is not None:
        raise ValueError(f"--kernels triton: {reason}")


def _check_sampling_args(max_new_tokens: int, temperature: float) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")


CHECK_EVERY = 16  # on CUDA, sampling errors are read back every this many tokens (each read is a host sync)


def _check_every(device: torch.device) -> int:
    """How many tokens may pass before the sampled ids are checked for bad rows: 1 (every call raises at once,
    ``validate=True``) where a check is free, :data:`CHECK_EVERY` on CUDA, where each check is a device sync."""
    return CHECK_EVERY if device.type == "cuda" else 1


def _read_check(worst: torch.Tensor, done: torch.Tensor | None) -> tuple[int, bool]:
    """The one host read of a check point: the smallest id sampled so far (negative: a bad row)
    and, when ``done`` is given, whether every row has produced eos (both in one small tensor)."""
    if done is None:
        return int(worst), False
    smallest, all_done = torch.stack((worst, done.all().long())).tolist()
    return smallest, bool(all_done)


def _step_error(step: int, e: ValueError) -> ValueError:
    return ValueError(f"generation step {step + 1}: {e}")


def _raise_first_bad(pending: list[torch.Tensor], first_step: int) -> None:
    """The error of the first step among ``pending`` (the raw ids since the last check) that holds a bad row."""
    for i, raw in enumerate(pending):
        try:
            check_sampled(raw)
        except ValueError as e:
            raise _step_error(first_step + i, e) from None


@torch.no_grad()
def generate_tokens(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    eos_token: int | None = None,
    use_cache: bool = True,
) -> Iterator[torch.Tensor]:
    """Yield each new (B,) column of token ids as it is sampled.

    With ``use_cache`` each step feeds one position through the model; once the sequence outgrows
    ``context_length`` the window slides and the cache is rebuilt from the last ``context_length`` tokens,
    so the output equals the cache-free computation exactly. Stops early when every row has produced
    ``eos_token``.

    A bad row (NaN or +inf logits, ...) raises ``ValueError("generation step S: sample: row R: <reason>")``, S
    counted from 1. On the CPU it is raised at step S. On CUDA, where reading a check result is a device sync,
    the loop does not sync per token for it: bad ids are kept on the device and read back every
    :data:`CHECK_EVERY` (16) tokens, with the last token, and at every step with ``eos_token`` (folded into the
    eos read), always before that step's column is yielded. So on CUDA a bad row is reported within 16 tokens,
    and the up to 15 columns yielded before it hold id 0 in the bad row's place (a consumer that stops
    early may never see the error). Yielded ids are never negative.
    """
    _check_sampling_args(max_new_tokens, temperature)
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be a non-empty (B, T) tensor of token ids, got shape {tuple(idx.shape)}")
    ctx = model.config.context_length
    gen = None
    if seed is not None:
        gen = torch.Generator(device=idx.device)
        gen.manual_seed(seed)
    every = _check_every(idx.device)
    deferred = every > 1
    was_training = model.training
    model.eval()
    try:
        seq = idx
        caches = None
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        worst = torch.zeros((), dtype=torch.long, device=idx.device)  # smallest id since the last check
        pending: list[torch.Tensor] = []  # the raw ids since the last check, to name the step on failure
        for step in range(max_new_tokens):
            if not use_cache:
                logits = model(seq[:, -ctx:], last_only=True)[:, -1, :]
            elif caches is None or seq.shape[1] > ctx:
                # (Re)fill the cache with the visible window; leave room for one more token.
                window = seq[:, -ctx:]
                caches = model.new_kv_caches(seq.shape[0], ctx)
                logits = model(window, kv_caches=caches, last_only=True)[:, -1, :]
            else:
                logits = model(seq[:, -1:], kv_caches=caches, last_only=True)[:, -1, :]
            if caches is not None and caches[0].length >= ctx:
                caches = None  # full: the next step slides the window and rebuilds
            try:
                nxt = sample(
                    logits,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    min_p=min_p,
                    repetition_penalty=repetition_penalty,
                    prev_tokens=seq if repetition_penalty else None,
                    generator=gen,
                    validate=not deferred,
                )
            except ValueError as e:
                raise _step_error(step, e) from None
            if deferred:
                # A bad row's id is -(status): remember it, and feed the model a valid id meanwhile (an id out of
                # the embedding's range would be a device-side assert, fatal to the CUDA context).
                pending.append(nxt)
                if nxt.numel():
                    worst = torch.minimum(worst, nxt.min())
                nxt = nxt.clamp(min=0)
            if eos_token is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token), nxt)
                done |= nxt == eos_token
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            stop = False
            if deferred and (eos_token is not None or (step + 1) % every == 0 or step + 1 == max_new_tokens):
                smallest, stop = _read_check(worst, done if eos_token is not None else None)
                if smallest < 0:
                    _raise_first_bad(pending, step + 1 - len(pending))
                pending.clear()
            elif eos_token is not None:
                stop = bool(done.all())
            yield nxt
            if stop:
                break
    finally:
        model.train(was_training)


def generate(
    model: GPT,
    idx: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    *,
    prompt: str | None = None,
    max_length: int | None = None,
    tokenizer: Any = None,
    stop_at_eos: bool = False,
    **kwargs: Any,
) -> torch.Tensor | str:
    """``generate(model, idx, max_new_tokens, ...)`` → ids (B, T + new);
    ``generate(model, prompt="text", max_length=100, ...)`` → the prompt and its continuation as a string."""
    if prompt is not None:
        if idx is not None:
            raise ValueError("pass either idx (token ids) or prompt (text), not both")
        n = max_new_tokens if max_new_tokens is not None else max_length if max_length is not None else 100
        return generate_text(model, prompt, max_new_tokens=n, tokenizer=tokenizer, stop_at_eos=stop_at_eos, **kwargs)
    if idx is None or max_new_tokens is None:
        raise ValueError("generate needs idx and max_new_tokens (or prompt= and max_length= for text)")
    eos = _eos_of(tokenizer) if stop_at_eos else None
    cols = list(generate_tokens(model, idx, max_new_tokens, eos_token=eos, **kwargs))
    return torch.cat([idx, torch.stack(cols, dim=1)], dim=1) if cols else idx


def _eos_of(tokenizer: Any) -> int | None:
    if tokenizer is None:
        from .tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    return getattr(tokenizer, "eot_token", None)


def generate_text(
    model: GPT,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    *,
    tokenizer: Any = None,
    stop_at_eos: bool = False,
    on_text: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> str:
    """The prompt followed by up to ``max_new_tokens`` sampled tokens, as text.

    ``on_text`` receives each decoded piece as it comes (the CLI streams through it). With ``stop_at_eos``
    generation ends at ``<|endoftext|>``, which is not included in the text.
    """
    if tokenizer is None:
        from .tokenizer import get_tokenizer

        tokenizer = get_tokenizer()
    ids = tokenizer.encode(prompt)
    if not ids:
        raise ValueError("prompt must not be empty")
    device = model.transformer.wte.weight.device
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    eos = getattr(tokenizer, "eot_token", None) if stop_at_eos else None
    tokens = generate_tokens(model, idx, max_new_tokens, temperature=temperature, eos_token=eos, **kwargs)
    if on_text is None:  # nothing to stream: read the ids once at the end (on CUDA a read per token is a sync)
        cols = list(tokens)
        ids_out: list[int] = torch.cat(cols).tolist() if cols else []
        if eos is not None and eos in ids_out:
            ids_out = ids_out[: ids_out.index(eos)]
        return prompt + tokenizer.decode(ids_out)
    out: list[int] = []
    printed = ""
    for col in tokens:
        t = int(col[0])
        if eos is not None and t == eos:
            break
        out.append(t)
        text = tokenizer.decode(out)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            on_text(text[len(printed) :])
            printed = text
    text = tokenizer.decode(out)
    if len(text) > len(printed):
        on_text(text[len(printed) :])
    return prompt + text
