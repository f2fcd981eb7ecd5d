"""Token sampling: repetition penalty, temperature, top-k, top-p and min-p, then one draw per row, in one call.

:func:`sample` runs the compiled op ``torch.ops.gptkernels.sample_tokens`` (``csrc/sampling.cpp`` on the CPU,
``csrc/sampling_cuda.cu`` on CUDA), loaded on first use: built by ``setup.py`` when torch was there at install time,
else compiled once and cached (see ``gptkernels/_extension.py``; ``python -m gptkernels.build`` does it ahead of
time). Without it, it runs :func:`sample_reference`, the pure-PyTorch version of the same computation, and warns
once saying why. :func:`extension_status` (and ``HAS_EXTENSION`` / ``HAS_CUDA_EXTENSION``, which load the op when
first read) tell which one runs.

Semantics, per row, in this order (one threshold per filter; a filter set to None is off):

1. repetition penalty (CTRL / Hugging Face): for every distinct id in ``prev_tokens``, ``l / penalty`` if the logit
   ``l > 0`` else ``l * penalty``.
2. temperature: ``x = l / temperature`` in float32. ``temperature == 0`` or ``top_k == 1`` is greedy: the argmax of
   the penalised logits (first index on ties), logprob 0.
3. top-k: keep ``x >= `` the k-th largest ``x``; ties at the threshold are all kept (as Hugging Face does).
   ``top_k == 0`` or ``>= V`` keeps everything.
4. top-p: with ``p_i`` the softmax over the top-k set, keep the tokens whose ``x >= v`` for the largest ``v`` at
   which the tokens with ``x >= v`` hold mass ``>= top_p``: the smallest set of most likely tokens that reaches
   ``top_p``, extended to all tokens tied with its least likely one. ``top_p == 1`` keeps everything.
5. min-p: keep ``p_i >= min_p * max p``, i.e. ``exp(x_i - max x) >= min_p`` (renormalising after top-p does not
   change the ratio). ``min_p == 0`` keeps everything.
6. draw: one uniform ``u`` per row from ``generator``; the token is the first kept one, in id order, whose
   cumulative mass exceeds ``u`` times the kept mass (inverse CDF). ``-inf`` logits are never drawn.

To make the C++, CUDA and PyTorch implementations pick *the same token for the same uniforms*, every step that
decides a token is a fixed sequence of IEEE operations (see ``csrc/sampling.h``): ``exp`` is Cephes' float32
polynomial (within ~1 ulp of ``torch.exp``), and masses are int64 fixed point ``int(w * 2**s)`` with
``s = 62 - V.bit_length()``, so sums are exact in any order. Tokens whose relative weight is below ``2**-s``
(``x - max x < -s ln 2``, about -32 at V=50257) have zero mass: they cannot be drawn (their true probability is
below 1.5e-14 times the top token's).

Errors (``ValueError``): NaN or +inf in the logits, a row with no finite logit, temperature < 0, top_k < 0,
top_p outside (0, 1], min_p outside [0, 1], repetition_penalty <= 0, ids in prev_tokens outside [0, V). On CUDA the
data checks cost one device sync per call; ``validate=False`` skips it: a bad row then gets id ``-code``, the
negated status code of ``csrc/sampling.h`` (1-11, so the reason stays on the device), and :func:`check_sampled`
raises the very error ``validate=True`` would have raised, later, with one host read. Nothing else syncs: numbers
travel with the launch and the uniforms are drawn on the device (give a CUDA ``generator`` for CUDA logits; a CPU
one costs a host-to-device copy). :func:`gptkernels.generation.generate_tokens` uses this on CUDA: it checks the
ids every 16 tokens (and wherever it reads them anyway), so there a bad row is reported within 16 tokens.
"""

from __future__ import annotations

import math
import threading
import warnings
from numbers import Integral, Real

import torch

from . import _extension

__all__ = [
    "HAS_CUDA_EXTENSION",
    "HAS_EXTENSION",
    "check_sampled",
    "extension_status",
    "load_extension",
    "sample",
    "sample_reference",
]

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PARAMS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")  # columns of the (B, 5) params
_NEUTRAL = (1.0, 0.0, 1.0, 0.0, 1.0)
_WARNED: set[str] = set()

# Row status codes and messages of csrc/sampling.h, in the order the checks run.
_STATUS = {
    1: "temperature must be finite and >= 0 (0 is greedy)",
    2: "top_k must be an integer >= 0 (0 disables it)",
    3: "top_p must be in (0, 1]",
    4: "min_p must be in [0, 1]",
    5: "repetition_penalty must be finite and > 0",
    6: "uniforms must be in [0, 1)",
    7: "prev_tokens holds an id outside [0, vocab_size)",
    8: "logits contain NaN",
    9: "logits contain +inf",
    10: "logits have no finite value (every token is -inf)",
    11: "logits / temperature overflows float32; use temperature=0 for greedy",
}

# Cephes expf, as the exact float32 constants of csrc/sampling.h.
_EXP_MIN = float.fromhex("-0x1.5cp+6")
_LOG2E = float.fromhex("0x1.715476p+0")
_ROUND_MAGIC = float.fromhex("0x1.8p+23")
_LN2_HI = float.fromhex("0x1.63p-1")
_LN2_LO = float.fromhex("-0x1.bd0106p-13")
_POLY = tuple(
    float.fromhex(h) for h in ("0x1.a0d2cep-13", "0x1.6e879cp-10", "0x1.111210p-7", "0x1.555382p-5", "0x1.555554p-3")
)
_LN2 = 0.6931471805599453


# ---------------------------------------------------------------------------------------------------------
# The compiled op: loaded (built if need be) on first use, not at import
# ---------------------------------------------------------------------------------------------------------

_STATE: _extension.ExtensionState | None = None  # set once by load_extension()
_LOAD_LOCK = threading.Lock()


def _sample_tokens_fake(logits, uniforms, params, row_params, prev_tokens, check):
    b = logits.shape[0]
    return logits.new_empty((b,), dtype=torch.long), logits.new_empty((b,), dtype=torch.float32)


def load_extension(force: bool = False) -> bool:
    """Load the compiled op now, compiling it first if this torch has no build of it yet (one line is printed
    then; about a minute, once per torch version). True when it is loaded. Later calls return at once.

    Args:
        force: recompile the cached build first (and retry one that failed); only before the op is loaded.
    """
    global _STATE, HAS_EXTENSION, HAS_CUDA_EXTENSION
    with _LOAD_LOCK:
        if _STATE is None:
            try:
                state = _extension.load(force=force)
            except Exception as e:  # noqa: BLE001 - whatever breaks in the loader, sampling must still work
                reason = f"loading it failed ({type(e).__name__}: {_extension._plain(e)})"
                state = _extension.ExtensionState(False, reason=reason, fix="report this as a gptkernels bug")
            if state.loaded:
                torch.library.register_fake("gptkernels::sample_tokens")(_sample_tokens_fake)
            HAS_EXTENSION, HAS_CUDA_EXTENSION = state.loaded, state.with_cuda
            _STATE = state
    return HAS_EXTENSION


def extension_status() -> str:
    """Which sampling implementation runs, in a few words, e.g. ``compiled C++ op (CPU), CUDA op (9.0+PTX)`` or
    ``PyTorch fallback (no C++ compiler found: `c++` is not on PATH)``. Loads the op first (see
    :func:`load_extension`)."""
    load_extension()
    return _STATE.describe()


def __getattr__(name: str):
    # HAS_EXTENSION / HAS_CUDA_EXTENSION are only known once the op is loaded: reading them loads it, then they
    # are plain module attributes.
    if name in ("HAS_EXTENSION", "HAS_CUDA_EXTENSION"):
        load_extension()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------------
# PyTorch reference (the fallback and the test oracle)
# ---------------------------------------------------------------------------------------------------------


def _exp_nonpos(t: torch.Tensor) -> torch.Tensor:
    """exp(t) for float32 t <= 0, replaying csrc/sampling.h's exp_nonpos operation by operation (same bits)."""
    tiny = ~(t >= _EXP_MIN)
    t = torch.where(tiny, _EXP_MIN, t)
    fx = (t * _LOG2E + _ROUND_MAGIC) - _ROUND_MAGIC  # round to nearest integer
    r = t - fx * _LN2_HI
    r = r - fx * _LN2_LO
    p = r * _POLY[0] + _POLY[1]
    for c in (*_POLY[2:], 0.5):
        p = p * r + c
    p = p * (r * r) + r + 1.0
    scale = torch.bitwise_left_shift(fx.to(torch.int32) + 127, 23).view(torch.float32)
    return torch.where(tiny, 0.0, p * scale)


def _row_error(row: int, code: int) -> ValueError:
    """The error of a bad row, worded as the compiled op words it."""
    return ValueError(f"sample: row {row}: {_STATUS.get(code, f'unknown status {code}')}")


def _mass_shift(vocab: int) -> int:
    return 62 - vocab.bit_length()


def _fail(status: torch.Tensor, cond: torch.Tensor, code: int) -> torch.Tensor:
    """Rows still fine (0) where ``cond`` holds get ``code``: the first failing check wins, as in C++."""
    return torch.where((status == 0) & cond, code, status)


def _row_status(logits: torch.Tensor, uniforms: torch.Tensor, params: torch.Tensor, prev: torch.Tensor | None):
    """(B,) int32 status of every row for the checks that need no computation (codes 1-9 of ``_STATUS``)."""
    status = torch.zeros(logits.shape[0], dtype=torch.int32, device=logits.device)
    t32, k, p, mp, pen32 = params[:, 0].float(), params[:, 1], params[:, 2], params[:, 3], params[:, 4].float()
    status = _fail(status, ~(t32 >= 0) | (t32 == math.inf), 1)
    status = _fail(status, ~(k >= 0) | (k != k.floor()), 2)
    status = _fail(status, ~((p > 0) & (p <= 1)), 3)
    status = _fail(status, ~((mp >= 0) & (mp <= 1)), 4)
    status = _fail(status, ~(pen32 > 0) | (pen32 == math.inf), 5)
    status = _fail(status, ~((uniforms >= 0) & (uniforms < 1)), 6)
    if prev is not None and prev.shape[1] > 0:
        status = _fail(status, ((prev < 0) | (prev >= logits.shape[1])).any(dim=1), 7)
    status = _fail(status, torch.isnan(logits).any(dim=1), 8)
    return _fail(status, (logits == math.inf).any(dim=1), 9)


def _reference_core(
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    params: torch.Tensor,
    prev_tokens: torch.Tensor | None,
    check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``torch.ops.gptkernels.sample_tokens`` computes, in PyTorch: same arguments, same outputs.

    logits (B, V) float; uniforms (B,) float64 in [0, 1); params (B, 5) float64 = temperature, top_k, top_p,
    min_p, repetition_penalty (neutral: 1, 0, 1, 0, 1); prev_tokens (B, T) int64 or None.
    Returns ids (B,) int64 and logprobs (B,) float32; bad rows raise ValueError (check) or get id -(status code)
    and a NaN logprob.
    """
    b, v = logits.shape
    lf = logits.float()
    status = _row_status(lf, uniforms, params, prev_tokens)
    ok = status == 0
    # Bad rows are computed on harmless stand-ins and masked at the end.
    neutral = torch.tensor(_NEUTRAL, dtype=torch.float64, device=params.device)
    params = torch.where(ok[:, None], params, neutral)
    lf = torch.where(ok[:, None], lf, 0.0)
    uniforms = torch.where(ok, uniforms, 0.0)
    temperature, top_p, min_p, penalty = (params[:, i].float() for i in (0, 2, 3, 4))
    top_k = torch.minimum(params[:, 1], torch.tensor(float(v), dtype=torch.float64, device=params.device)).long()

    penalised = lf
    if prev_tokens is not None and prev_tokens.shape[1] > 0:
        prev = prev_tokens.clamp(0, v - 1)
        g = lf.gather(1, prev)  # the original logits, so a repeated id is penalised once
        g = torch.where(g > 0, g / penalty[:, None], g * penalty[:, None])
        penalised = lf.scatter(1, prev, g)
    greedy = (temperature == 0) | (top_k == 1)
    divide = ~greedy & (temperature != 1)
    x = torch.where(divide[:, None], penalised / torch.where(divide, temperature, 1.0)[:, None], penalised)
    m = x.max(dim=1).values
    status = _fail(status, m == -math.inf, 10)
    status = _fail(status, m == math.inf, 11)
    ok = status == 0
    if check and not bool(ok.all()):
        row = int((~ok).nonzero()[0, 0])
        raise _row_error(row, int(status[row]))
    x = torch.where(ok[:, None], x, 0.0)
    m = torch.where(ok, m, 0.0)
    greedy_ids = x.argmax(dim=1)

    neg_inf = torch.full_like(m, -math.inf)
    xs, order = x.sort(dim=1, descending=True)
    use_k = (top_k > 1) & (top_k < v)
    tau_k = torch.where(use_k, xs.gather(1, (top_k - 1).clamp(0, v - 1)[:, None]).squeeze(1), neg_inf)
    w = torch.where(x >= tau_k[:, None], _exp_nonpos(x - m[:, None]), 0.0)
    shift = _mass_shift(v)
    mass = (w * float(2**shift)).long()
    z_k = mass.sum(dim=1)
    need = torch.minimum((top_p.double() * z_k.double()).ceil().long().clamp(min=1), z_k)
    pos = torch.searchsorted(mass.gather(1, order).cumsum(dim=1), need[:, None]).clamp(max=v - 1)
    tau_p = torch.where(top_p < 1, xs.gather(1, pos).squeeze(1), neg_inf)
    keep = (x >= torch.maximum(tau_k, tau_p)[:, None]) & (w >= min_p[:, None])
    kept_mass = torch.where(keep, mass, 0)
    z = kept_mass.sum(dim=1)
    target = torch.minimum((uniforms * z.double()).long(), z - 1)
    ids = torch.searchsorted(kept_mass.cumsum(dim=1), target[:, None], right=True).clamp(max=v - 1)
    x_tok = x.gather(1, ids).squeeze(1)
    logprobs = ((x_tok.double() - m.double()) - (torch.log(z.double()) - shift * _LN2)).float()

    ids = torch.where(greedy, greedy_ids, ids.squeeze(1))
    logprobs = torch.where(greedy, 0.0, logprobs)
    ids = torch.where(ok, ids, -status.long())
    logprobs = torch.where(ok, logprobs, math.nan)
    return ids, logprobs


# ---------------------------------------------------------------------------------------------------------
# Argument handling shared by sample and sample_reference
# ---------------------------------------------------------------------------------------------------------


def _check_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"sample: {name} must be a number or a (B,) tensor, got {type(value).__name__}")
    value = float(value)
    if name == "temperature":
        ok = math.isfinite(value) and value >= 0
        rule = "finite and >= 0 (0 is greedy)"
    elif name == "top_k":
        ok = value >= 0
        rule = "an integer >= 0 (0 disables it)"
    elif name == "top_p":
        ok = 0 < value <= 1
        rule = "in (0, 1]"
    elif name == "min_p":
        ok = 0 <= value <= 1
        rule = "in [0, 1]"
    else:
        ok = math.isfinite(value) and value > 0
        rule = "finite and > 0"
    if not ok:
        raise ValueError(f"sample: {name} must be {rule}, got {value!r}")
    return value


def _prepare(logits, temperature, top_k, top_p, min_p, repetition_penalty, prev_tokens, generator, uniforms):
    """Validated (logits (B, V), uniforms (B,) f64, params: 5 floats, row_params: (B, 5) f64 tensor when any
    parameter is per row else None, prev_tokens (B, T) i64 | None, squeeze)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"sample: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"sample: logits must be float32, float16, bfloat16 or float64, got {logits.dtype}")
    squeeze = logits.dim() == 1
    if squeeze:
        logits = logits[None]
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"sample: logits must be (B, V) or (V,) with V >= 1, got shape {tuple(logits.shape)}")
    b, v = logits.shape
    device = logits.device

    values = []
    row_params = None
    all_numbers = True
    for name, value, neutral in zip(_PARAMS, (temperature, top_k, top_p, min_p, repetition_penalty), _NEUTRAL):
        if value is None:
            values.append(neutral)
        elif isinstance(value, torch.Tensor):
            all_numbers = False
            if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != b):
                raise ValueError(f"sample: {name} must be a number or a ({b},) tensor, got shape {tuple(value.shape)}")
            if value.device != device:
                raise ValueError(f"sample: {name} is on {value.device} but logits are on {device}")
            if name == "top_k":
                if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
                    raise TypeError(f"sample: top_k must be an integer tensor, got {value.dtype}")
                value = value.clamp(max=v)
            elif not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
                raise TypeError(f"sample: {name} must be a float tensor, got {value.dtype}")
            values.append(value.to(torch.float64).expand(b))
        else:
            if name == "top_k" and not isinstance(value, Integral):
                raise TypeError(f"sample: top_k must be an int or a (B,) integer tensor, got {type(value).__name__}")
            values.append(min(_check_number(name, value), float(v)) if name == "top_k" else _check_number(name, value))
    params = [x if isinstance(x, float) else 0.0 for x in values]  # numbers go with the launch: no copy, no sync
    if not all_numbers:
        cols = [
            x if isinstance(x, torch.Tensor) else torch.full((b,), x, dtype=torch.float64, device=device)
            for x in values
        ]
        row_params = torch.stack(cols, dim=1)

    if repetition_penalty is None:
        prev_tokens = None
    elif prev_tokens is None:
        raise ValueError("sample: repetition_penalty needs prev_tokens, the (B, T) ids generated so far")
    else:
        if not isinstance(prev_tokens, torch.Tensor) or prev_tokens.dtype not in (
            torch.int64,
            torch.int32,
            torch.int16,
        ):
            raise TypeError("sample: prev_tokens must be an integer tensor of token ids")
        if prev_tokens.dim() != 2 or prev_tokens.shape[0] != b:
            raise ValueError(f"sample: prev_tokens must be ({b}, T), got shape {tuple(prev_tokens.shape)}")
        if prev_tokens.device != device:
            raise ValueError(f"sample: prev_tokens is on {prev_tokens.device} but logits are on {device}")
        prev_tokens = prev_tokens.long()

    if uniforms is None:
        gen_device = generator.device if generator is not None else device
        uniforms = torch.rand(b, generator=generator, dtype=torch.float64, device=gen_device).to(device)
    else:
        if not isinstance(uniforms, torch.Tensor) or uniforms.shape != (b,):
            raise ValueError(f"sample: uniforms must be a ({b},) tensor")
        uniforms = uniforms.to(device=device, dtype=torch.float64)
    return logits, uniforms, params, row_params, prev_tokens, squeeze


def _params_table(params: list[float], row_params: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """The (B, 5) float64 parameter table the reference takes."""
    if row_params is not None:
        return row_params
    return torch.tensor(params, dtype=torch.float64, device=logits.device).expand(logits.shape[0], len(_PARAMS))


@torch.compiler.assume_constant_result  # torch.compile runs it (loading the op) while tracing, not in the graph
def _fallback_reason(device: torch.device) -> str | None:
    """None when the compiled op takes ``device``'s tensors, else why not and what to do, in plain words."""
    if _STATE is None:
        load_extension()
    if not HAS_EXTENSION:
        if _STATE.loaded:  # switched off by hand (tests)
            return "the compiled sampling op is switched off (HAS_EXTENSION = False)"
        return f"the compiled sampling op is not built: {_STATE.reason}. To build it: {_STATE.fix}"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if HAS_CUDA_EXTENSION:
            return None
        why = _STATE.cuda_reason or "this torch has no CUDA"
        return f"the compiled sampling op has no CUDA kernel here: {why}"
    return f"the compiled sampling op has no kernel for {device.type} tensors"


def _warn_once(reason: str) -> None:
    if reason not in _WARNED:
        _WARNED.add(reason)
        warnings.warn(
            f"gptkernels.sample: using the slower PyTorch implementation because {reason}",
            RuntimeWarning,
            stacklevel=3,
        )


def _finish(ids, logprobs, squeeze, return_logprobs):
    if squeeze:
        ids, logprobs = ids[0], logprobs[0]
    return (ids, logprobs) if return_logprobs else ids


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def sample(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    min_p: float | torch.Tensor | None = None,
    repetition_penalty: float | torch.Tensor | None = None,
    prev_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_logprobs: bool = False,
    *,
    uniforms: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``logits`` (see the module docstring for the exact semantics).

    Args:
        logits: (B, V) or (V,) float32, float16, bfloat16 (or float64, computed in float32).
        temperature, top_k, top_p, min_p, repetition_penalty: a Python number, or a (B,) tensor on the logits'
            device for per-row settings. None (and top_k=0, top_p=1, min_p=0) disables a filter.
        prev_tokens: (B, T) integer ids seen so far; needed with ``repetition_penalty``.
        generator: draws the one float64 uniform per row (same seed, same tokens on a given device).
        return_logprobs: also return the float32 log-probability of each drawn token under the filtered,
            temperature-scaled distribution (0 for greedy rows).
        uniforms: (B,) values in [0, 1) to use instead of drawing them (tests, replay).
        validate: raise ValueError on bad data (NaN, ...). On CUDA this syncs once; False skips the sync and
            gives such a row id ``-code``, its status code (1-11, see :func:`check_sampled`), and a NaN logprob.

    Returns:
        ids (B,) int64, or (ids, logprobs (B,) float32) with ``return_logprobs``; () instead of (B,) for 1-D logits.
    """
    logits, uniforms, params, row_params, prev_tokens, squeeze = _prepare(
        logits, temperature, top_k, top_p, min_p, repetition_penalty, prev_tokens, generator, uniforms
    )
    reason = _fallback_reason(logits.device)
    if reason is None:
        ids, logprobs = torch.ops.gptkernels.sample_tokens.default(
            logits, uniforms, params, row_params, prev_tokens, validate
        )
    else:
        _warn_once(reason)
        table = _params_table(params, row_params, logits)
        ids, logprobs = _reference_core(logits, uniforms, table, prev_tokens, check=validate)
    return _finish(ids, logprobs, squeeze, return_logprobs)


def sample_reference(
    logits: torch.Tensor,
    temperature: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor | None = None,
    top_p: float | torch.Tensor | None = None,
    min_p: float | torch.Tensor | None = None,
    repetition_penalty: float | torch.Tensor | None = None,
    prev_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_logprobs: bool = False,
    *,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample` in pure PyTorch (full sort, cumsum, searchsorted): same arguments, same tokens for the same
    uniforms (the compiled op's oracle). Always validates."""
    logits, uniforms, params, row_params, prev_tokens, squeeze = _prepare(
        logits, temperature, top_k, top_p, min_p, repetition_penalty, prev_tokens, generator, uniforms
    )
    table = _params_table(params, row_params, logits)
    ids, logprobs = _reference_core(logits, uniforms, table, prev_tokens, check=True)
    return _finish(ids, logprobs, squeeze, return_logprobs)


def check_sampled(ids: torch.Tensor) -> None:
    """Raise the ``ValueError`` that ``validate=True`` would have raised for ids drawn with ``validate=False``.

    One host read (``int(ids.min())``) when every row is fine; the first bad row and its reason are read only on
    failure. On CUDA it is the sync that ``validate=False`` put off, so call it when the ids are read anyway, or
    once for many steps (e.g. on the running ``torch.minimum`` of the ids, which keeps the worst code).

    Args:
        ids: (B,) or () int64 ids from :func:`sample` with ``validate=False``: a token id >= 0, or ``-code`` for a
            bad row (code: 1 temperature, 2 top_k, 3 top_p, 4 min_p, 5 repetition_penalty, 6 uniforms,
            7 prev_tokens, 8 NaN logits, 9 +inf logits, 10 no finite logit, 11 logits / temperature overflow).

    Raises:
        ValueError: ``sample: row R: <reason>`` for the first row R whose id is negative.
    """
    if ids.numel() == 0 or int(ids.min()) >= 0:
        return
    flat = ids.reshape(-1)
    row = int((flat < 0).nonzero()[0, 0])
    raise _row_error(row, -int(flat[row]))
