"""A batched generation engine with continuous batching, free of HTTP (the server in ``server.py`` drives it).

Every request becomes a :class:`Sequence` that owns one slot of a preallocated KV-cache pool of shape
``(n_layers, slots, n_heads, max_len, head_dim)``. Each :meth:`Engine.step`:

1. admits waiting sequences into free slots (first come, first served);
2. prefills: feeds prompt tokens of newly admitted sequences through the model, at most ``max_prefill_tokens``
   per step in total (a longer prompt is prefilled in chunks over several steps), so that a new request never
   stalls the running ones for long;
3. decodes: one forward of every running sequence's last token, batched; attention reads each row's own slot
   with a mask for its length (rows of different lengths decode together);
4. samples the next token of every row in one :func:`gptkernels.sample` call with per-row temperature, top-k,
   top-p, min-p and repetition penalty, each row drawing its uniform from its own seeded generator;
5. checks the stop conditions (max tokens, end-of-text, stop strings found in the decoded text; the stop string
   is never emitted) and frees the slots of finished sequences for the next waiting ones.

Greedy output equals ``model.generate`` token for token (the tests check it under mixed load): the prompt goes
through the model's own forward (the very computation of ``generate``'s first step when it fits in one chunk) and
each decode step runs the model's own modules and weights. What batching changes is the rounding inside the
matrix products (BLAS computes a 32-row product in another order than a 1-row one), a few ulps of the logits,
which could only flip an exact near-tie between the two most likely tokens.

Typical use from Python::

    engine = Engine(model, tokenizer)
    outs = engine.generate(["Hello", "The list"], SamplingParams(max_tokens=20, temperature=0))
"""

from __future__ import annotations

import heapq
import itertools
import math
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..nn import KVCache
from ..sampling import sample

MAX_LOGPROBS = 20  # alternatives per token that a request may ask for


@dataclass
class SamplingParams:
    """How one sequence is sampled and when it stops (the neutral value turns a setting off)."""

    max_tokens: int = 16  # new tokens at most
    temperature: float = 1.0  # 0 is greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # CTRL / Hugging Face, over prompt and output; 1: off
    presence_penalty: float = 0.0  # OpenAI: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the generated tokens
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    stop: tuple[str, ...] = ()  # stop strings, searched in the decoded output and cut from it
    seed: int | None = None  # per-sequence generator seed: same seed, same tokens
    ignore_eos: bool = False  # keep going after the end-of-text token
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's logprob and the top k alternatives

    def check(self, vocab_size: int) -> None:
        """Raise ValueError naming the first bad setting."""

        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "a positive integer")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", "finite and >= 0 (0 is greedy)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise bad("repetition_penalty", "finite and > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise bad(name, "in [-2, 2]")
        for tok, bias in self.logit_bias.items():
            if not 0 <= tok < vocab_size:
                raise ValueError(f"logit_bias: token id {tok} is outside the vocabulary [0, {vocab_size})")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias: the bias of token {tok} must be in [-100, 100], got {bias!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64
        ):
            raise bad("seed", "an integer in [-2**63, 2**64)")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"an integer in [0, {MAX_LOGPROBS}]")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float  # log-probability under the model (log-softmax of the raw logits)
    top: list[tuple[int, float]]  # the most likely alternatives, (token id, logprob), best first


@dataclass
class Output:
    """What one step produced for one request: the new text and tokens since the previous output."""

    request_id: str
    text: str  # new text (held back while it could be the start of a stop string or of a multi-byte character)
    token_ids: list[int]  # new tokens (the end-of-text token is not included)
    logprobs: list[TokenLogprob]  # one per new token, when asked for
    finished: bool
    # "stop" (end-of-text or a stop string), "length" (max_tokens), or "error" (the model gave NaN or +inf logits)
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class Sequence:
    """One request in the engine: its prompt, its slot in the KV-cache pool and what it generated."""

    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams, device: torch.device) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.slot = -1
        self.num_cached = 0  # positions of this sequence in its cache slot
        self.out_ids: list[int] = []
        self.text = ""  # decoded output, cut at a stop string
        self.emitted_text = 0  # characters of ``text`` already returned
        self.emitted_ids = 0
        self.logprobs: list[TokenLogprob] = []
        self.finish_reason: str | None = None
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))

    @property
    def prefilled(self) -> bool:
        return self.num_cached >= len(self.prompt_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.out_ids


class _SlotCache(KVCache):
    """A :class:`KVCache` whose storage is one slot of the engine's pool, so the model's forward writes there."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
        self.k, self.v, self.length = k, v, length


class Engine:
    """Continuous-batching generation over one :class:`gptkernels.GPT` (see the module docstring).

    Args:
        model: the model; put in eval mode. Its weights are used as they are (device and dtype).
        tokenizer: ``encode``/``decode``/``eot_token`` (needed for text prompts and stop strings).
        max_batch_size: KV-cache slots, i.e. sequences that decode together; more requests wait.
        max_len: positions per slot (prompt + output); defaults to the model's ``context_length``.
        max_prefill_tokens: prompt tokens prefilled per step, all new sequences together (chunked prefill).
        eos_token_id: the end-of-text id; by default the tokenizer's ``eot_token``. None never stops on it.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        max_batch_size: int = 32,
        max_len: int | None = None,
        max_prefill_tokens: int = 512,
        eos_token_id: int | None | str = "tokenizer",
    ) -> None:
        cfg = model.config
        max_len = cfg.context_length if max_len is None else max_len
        if not 1 <= max_len <= cfg.context_length:
            raise ValueError(f"max_len must be in [1, context_length={cfg.context_length}], got {max_len}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vocab_size = cfg.vocab_size
        self.max_len = max_len
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        if eos_token_id == "tokenizer":
            eos_token_id = getattr(tokenizer, "eot_token", None)
        self.eos_token_id = eos_token_id
        w = model.transformer.wte.weight
        self.device = w.device
        shape = (cfg.n_layers, max_batch_size, cfg.n_heads, max_len, cfg.head_dim)
        # Zeros, not empty: masked positions still enter the attention product as 0 * v, and 0 * NaN is NaN.
        self.k = torch.zeros(shape, device=w.device, dtype=w.dtype)
        self.v = torch.zeros(shape, device=w.device, dtype=w.dtype)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # holding a slot: prefilling or decoding
        self._owner: list[Sequence | None] = [None] * max_batch_size
        self._free = list(range(max_batch_size))  # a heap: the lowest free slot first keeps the batch dense
        self._ids = itertools.count()
        self.steps = 0
        self.num_finished = 0  # requests that ran to a stop condition
        self.num_aborted = 0  # requests dropped by abort_request / abort_all

    # -------------------------------------------------------------------------------------------------
    # Requests
    # -------------------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a text prompt (``<|endoftext|>`` in text is plain text), or ids checked as they are."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or give the engine a tokenizer")
            from ..tokenizer import encode_ordinary

            return encode_ordinary(self.tokenizer, prompt)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError if the request cannot run (changes nothing; safe from any thread)."""
        params.check(self.vocab_size)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; this model takes at most {self.max_len - 1} "
                f"(prompt + max_tokens <= {self.max_len})"
            )
        if len(prompt_ids) + params.max_tokens > self.max_len:
            raise ValueError(
                f"max_tokens={params.max_tokens} with a {len(prompt_ids)}-token prompt exceeds the context of "
                f"{self.max_len} tokens; ask for at most {self.max_len - len(prompt_ids)}"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")

    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request; returns its id. Raises ValueError for a request that cannot run."""
        params = SamplingParams() if params is None else params
        ids = self.encode(prompt)
        self.check_request(ids, params)
        rid = str(next(self._ids)) if request_id is None else request_id
        if any(s.request_id == rid for s in itertools.chain(self.waiting, self.running)):
            raise ValueError(f"request id {rid!r} is already in use")
        self.waiting.append(Sequence(rid, ids, params, self.device))
        return rid

    def abort_request(self, request_id: str) -> bool:
        """Drop a request (waiting or running) and free its slot; False if it is not here (already done)."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self.num_aborted += 1
                return True
        for seq in self.running:
            if seq.request_id == request_id:
                self._release(seq)
                self.num_aborted += 1
                return True
        return False

    def abort_all(self) -> list[str]:
        ids = [s.request_id for s in self.waiting] + [s.request_id for s in self.running]
        self.num_aborted += len(ids)
        self.waiting.clear()
        for seq in list(self.running):
            self._release(seq)
        return ids

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    # -------------------------------------------------------------------------------------------------
    # One step
    # -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[Output]:
        """Admit, prefill (bounded), decode every running sequence once, sample, check stops."""
        self.steps += 1
        while self.waiting and self._free:
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self._free)
            self._owner[seq.slot] = seq
            self.running.append(seq)

        decoding = [s for s in self.running if s.prefilled]
        rows: list[Sequence] = []
        logits: list[torch.Tensor] = []
        if decoding:
            self._compact(decoding)
            decoding.sort(key=lambda s: s.slot)
            rows += decoding
            logits.append(self._decode(decoding))
        budget = self.max_prefill_tokens
        for seq in [s for s in self.running if not s.prefilled]:
            if budget <= 0:
                break
            n = min(len(seq.prompt_ids) - seq.num_cached, budget)
            budget -= n
            last = self._prefill(seq, n)
            if seq.prefilled:
                rows.append(seq)
                logits.append(last)
        if not rows:
            return []
        tokens, logprobs = self._sample(rows, logits[0] if len(logits) == 1 else torch.cat(logits))
        outputs = []
        for i, seq in enumerate(rows):
            out = self._advance(seq, int(tokens[i]), None if logprobs is None else logprobs[i])
            if out is not None:
                outputs.append(out)
        return outputs

    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[Output]:
        """Run ``prompts`` to completion together; one :class:`Output` per prompt with the whole text and ids."""
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        acc: dict[str, Output] = {}
        while self.has_unfinished():
            for o in self.step():
                prev = acc.get(o.request_id)
                if prev is not None:
                    o.text, o.token_ids = prev.text + o.text, prev.token_ids + o.token_ids
                    o.logprobs = prev.logprobs + o.logprobs
                acc[o.request_id] = o
        return [acc[i] for i in ids]

    # -------------------------------------------------------------------------------------------------
    # Model
    # -------------------------------------------------------------------------------------------------
    def _prefill(self, seq: Sequence, n: int) -> torch.Tensor:
        """Feed the next ``n`` prompt tokens through the model's own forward, caching into the slot.

        Returns the last position's logits (1, V). With the whole prompt in one chunk this is exactly the
        computation of ``model.generate``'s first step.
        """
        s = seq.slot
        caches = [_SlotCache(self.k[i, s : s + 1], self.v[i, s : s + 1], seq.num_cached) for i in range(len(self.k))]
        chunk = seq.prompt_ids[seq.num_cached : seq.num_cached + n]
        idx = torch.tensor([chunk], dtype=torch.long, device=self.device)
        out = self.model(idx, kv_caches=caches, last_only=True)[:, -1, :]
        seq.num_cached += n
        return out

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One position for each of ``seqs`` (which hold slots 0..B-1 in order): logits (B, V)."""
        model, tr = self.model, self.model.transformer
        b = len(seqs)
        tok = torch.tensor([[s.out_ids[-1]] for s in seqs], dtype=torch.long, device=self.device)  # not cached yet
        pos = torch.tensor([s.num_cached for s in seqs], dtype=torch.long, device=self.device)  # (B,)
        length = max(s.num_cached for s in seqs) + 1
        mask = (torch.arange(length, device=self.device)[None, :] <= pos[:, None])[:, None, None, :]  # (B,1,1,L)
        rows = torch.arange(b, device=self.device)
        x = tr.drop(tr.wte(tok) + tr.wpe(pos)[:, None, :])  # (B, 1, C)
        for i, block in enumerate(tr.h):
            a = self._attention(block.attn, block.ln_1(x), i, rows, pos, length, mask)
            x, h = block.ln_2.forward_add(a, x)
            x = x + block.mlp(h)
        x = tr.ln_f(x)
        for s in seqs:
            s.num_cached += 1
        return model.lm_head(x)[:, -1, :]

    def _attention(self, attn, x, layer, rows, pos, length, mask) -> torch.Tensor:
        """The model's CausalSelfAttention for one new position per row, keys read from the rows' slots."""
        b, _, c = x.shape
        q, k, v = attn.c_attn(x).split(c, dim=2)
        q, k, v = (t.view(b, 1, attn.n_heads, attn.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, 1, hs)
        self.k[layer, rows, :, pos] = k[:, :, 0]
        self.v[layer, rows, :, pos] = v[:, :, 0]
        keys, values = self.k[layer, :b, :, :length], self.v[layer, :b, :, :length]  # (B, nh, L, hs)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=1.0 / math.sqrt(attn.head_dim))
        y = y.transpose(1, 2).contiguous().view(b, 1, c)
        return attn.resid_dropout(attn.c_proj(y))

    # -------------------------------------------------------------------------------------------------
    # Sampling and stopping
    # -------------------------------------------------------------------------------------------------
    def _sample(self, rows: list[Sequence], logits: torch.Tensor):
        """One :func:`gptkernels.sample` call for all rows; (tokens (R,), logprob rows or None)."""
        dev = logits.device
        ps = [s.params for s in rows]
        raw = logits
        adjust = [i for i, p in enumerate(ps) if p.presence_penalty or p.frequency_penalty or p.logit_bias]
        if adjust:
            logits = logits.float().clone()
            for i in adjust:
                p, seq = ps[i], rows[i]
                if seq.out_ids and (p.presence_penalty or p.frequency_penalty):
                    ids, counts = torch.tensor(seq.out_ids, device=dev).unique(return_counts=True)
                    logits[i, ids] -= p.presence_penalty + p.frequency_penalty * counts.float()
                if p.logit_bias:
                    ids = torch.tensor(list(p.logit_bias), device=dev)
                    logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=dev)
        penalty = prev = None
        if any(p.repetition_penalty != 1.0 for p in ps):
            penalty = torch.tensor([p.repetition_penalty for p in ps], dtype=torch.float64, device=dev)
            seqs_ids = [s.all_ids for s in rows]
            width = max(len(t) for t in seqs_ids)
            # Pad with the row's own first id: an id is penalised once however often it appears.
            prev = torch.tensor([t + [t[0]] * (width - len(t)) for t in seqs_ids], dtype=torch.long, device=dev)
        uniforms = torch.stack([torch.rand((), generator=s.generator, dtype=torch.float64, device=dev) for s in rows])
        tokens = sample(
            logits,
            # Below 1e-5 the division by temperature could overflow float32: such rows are greedy (as in vLLM).
            temperature=torch.tensor([_temperature(p) for p in ps], dtype=torch.float64, device=dev),
            top_k=torch.tensor([p.top_k for p in ps], dtype=torch.long, device=dev),
            top_p=torch.tensor([p.top_p for p in ps], dtype=torch.float64, device=dev),
            min_p=torch.tensor([p.min_p for p in ps], dtype=torch.float64, device=dev),
            repetition_penalty=penalty,
            prev_tokens=prev,
            uniforms=uniforms,
            validate=False,  # a bad row (NaN logits) gets a negative id (-status) and ends alone; the others go on
        ).tolist()
        want = [i for i, p in enumerate(ps) if p.logprobs is not None]
        if not want:
            return tokens, None
        lp = torch.log_softmax(raw[want].float(), dim=-1)
        k = max(ps[i].logprobs for i in want)
        top_v, top_i = lp.topk(max(k, 1), dim=-1)
        # A bad row's negative id would index out of range (a device-side assert on CUDA): it ends with "error"
        # and its logprob is dropped, so gather any valid index for it.
        chosen = lp.gather(1, torch.tensor([[max(tokens[i], 0)] for i in want], device=dev))[:, 0].tolist()
        result: list[TokenLogprob | None] = [None] * len(rows)
        for j, i in enumerate(want):
            n = ps[i].logprobs
            top = list(zip(top_i[j, :n].tolist(), top_v[j, :n].tolist()))
            result[i] = TokenLogprob(tokens[i], chosen[j], top)
        return tokens, result

    def _advance(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> Output | None:
        """Append ``token`` to ``seq``, check its stop conditions and return what it can emit now."""
        p = seq.params
        if token < 0:
            seq.finish_reason = "error"
        elif self.eos_token_id is not None and token == self.eos_token_id and not p.ignore_eos:
            seq.finish_reason = "stop"
        else:
            seq.out_ids.append(token)
            if logprob is not None:
                seq.logprobs.append(logprob)
            if self.tokenizer is not None:
                seq.text = self.tokenizer.decode(seq.out_ids)
                cut = min((i for i in (seq.text.find(s) for s in p.stop) if i >= 0), default=-1)
                if cut >= 0:
                    seq.text = seq.text[:cut]
                    seq.finish_reason = "stop"
            if seq.finish_reason is None and len(seq.out_ids) >= p.max_tokens:
                seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self._release(seq)
            self.num_finished += 1
            return self._output(seq, len(seq.text))
        safe = len(seq.text) - _held_back(seq.text, p.stop)
        if safe <= seq.emitted_text and len(seq.out_ids) == seq.emitted_ids:
            return None
        return self._output(seq, safe)

    def _output(self, seq: Sequence, upto: int) -> Output:
        text = seq.text[seq.emitted_text : max(upto, seq.emitted_text)]
        seq.emitted_text = max(upto, seq.emitted_text)
        ids, lps = seq.out_ids[seq.emitted_ids :], seq.logprobs[seq.emitted_ids :]
        seq.emitted_ids = len(seq.out_ids)
        return Output(
            seq.request_id,
            text,
            ids,
            lps,
            seq.finish_reason is not None,
            seq.finish_reason,
            len(seq.prompt_ids),
            len(seq.out_ids),
        )

    # -------------------------------------------------------------------------------------------------
    # Slots
    # -------------------------------------------------------------------------------------------------
    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self._owner[seq.slot] = None
            heapq.heappush(self._free, seq.slot)
            seq.slot = -1

    def _compact(self, decoding: list[Sequence]) -> None:
        """Move the decoding sequences into slots 0..B-1 so that the batch reads the pool through plain views."""
        b = len(decoding)
        outside = [s for s in decoding if s.slot >= b]
        if not outside:
            return
        targets = [t for t in range(b) if self._owner[t] is None or not self._owner[t].prefilled]
        for seq, dst in zip(outside, targets):
            other = self._owner[dst]
            src = seq.slot
            n, m = seq.num_cached, (other.num_cached if other is not None else 0)
            keep_k, keep_v = self.k[:, dst, :, :m].clone(), self.v[:, dst, :, :m].clone()
            self.k[:, dst, :, :n] = self.k[:, src, :, :n]
            self.v[:, dst, :, :n] = self.v[:, src, :, :n]
            self.k[:, src, :, :m], self.v[:, src, :, :m] = keep_k, keep_v
            self._owner[dst], self._owner[src] = seq, other
            seq.slot = dst
            if other is not None:
                other.slot = src
            else:  # dst was free: src becomes free instead
                self._free.remove(dst)
                self._free.append(src)
                heapq.heapify(self._free)


def _temperature(p: SamplingParams) -> float:
    return 0.0 if p.temperature < 1e-5 else p.temperature


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` not to emit yet: an unfinished multi-byte character, or the start of a
    stop string that the next tokens may complete."""
    held = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:n]):
                held = n
                break
    return held


__all__ = ["Engine", "Output", "SamplingParams", "Sequence", "TokenLogprob"]
