"""Causal flash attention with dropout: PyTorch reference, Triton kernels, launchers, registration."""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F

from . import _backend
from ._backend import use_triton
from ._triton import INTERPRETED, tl, triton
from ._triton import VERSION as TRITON_VERSION
from .utils import FLOAT_DTYPES, check_tensor, device_guard, max_registers, next_power_of_2

# ---------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------


def causal_mask(tq: int, tk: int, device: torch.device) -> torch.Tensor:
    """(tq, tk) bool, True where query i may see key j; aligned to the end when tq < tk (KV-cache decoding)."""
    i = torch.arange(tq, device=device)[:, None] + (tk - tq)
    j = torch.arange(tk, device=device)[None, :]
    return j <= i


def dropout_rate(dropout_p: float) -> float:
    """The drop rate the Triton kernels apply for ``dropout_p``: t / 256 with t = round(256 * dropout_p).

    Their RNG draws 8-bit uniforms, so the rate is quantised to 1/256 steps: within 1/512 of ``dropout_p``
    for 1/512 <= dropout_p <= 511/512. t is clamped to [1, 255], so a positive ``dropout_p`` below 1/512 still
    drops (1/256 of the scores) rather than silently none, and one above 511/512 drops 255/256. Kept scores are
    scaled by 1 / (1 - rate), so the output's expectation is exact.
    """
    if dropout_p <= 0.0:
        return 0.0
    return min(max(math.floor(dropout_p * 256.0 + 0.5), 1), 255) / 256.0


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    dropout_p: float = 0.0,
    scale: float | None = None,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Materialising attention, the oracle for the kernel.

    ``dropout_mask`` (B, H, Tq, Tk) bool, True = kept, replaces random dropout so that tests can compare the
    kernel with the reference under the same mask (:func:`attention_dropout_mask`); kept probabilities are then
    scaled like the kernel's, by ``1 / (1 - dropout_rate(dropout_p))`` (:func:`dropout_rate`).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    if dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_rate(dropout_p))
    elif dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    return p @ v


def attention_torch(q, k, v, causal: bool, dropout_p: float, scale: float | None) -> torch.Tensor:
    """The fast PyTorch path: SDPA, with an explicit end-aligned mask when q is shorter than k."""
    tq, tk = q.shape[-2], k.shape[-2]
    if not causal or tq == tk:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal and tq > 1, scale=scale)
    mask = causal_mask(tq, tk, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


# ---------------------------------------------------------------------------------------------------------
# Triton kernels
#
# Layout: q (B, H, Tq, D), k and v (B, H, Tk, D) with any strides (the model passes transposed views); one
# program per (query tile, batch*head) for the forward, dq and the backward's pre-pass, per (key tile, batch*head)
# for dk/dv (which by default also adds dQ atomically: the dq kernel runs only in deterministic mode). The head
# dimension is padded to BLOCK_D = max(16, next_pow2(D)) with masked loads (tl.dot needs K >= 16 on GPU).
# Scores live in log2 units: qk_scale = scale * log2(e), so the softmax uses exp2. The causal mask is aligned
# to the end: query i sees key j <= i + (Tk - Tq). Each loop over tiles is split so that tiles needing no mask
# (fully visible, fully inside the sequence) run without the mask arithmetic.
# ---------------------------------------------------------------------------------------------------------

_LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e)); literal inside the kernels

# fmt: off


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a (rows, cols) tile, zero-filling rows >= n_rows and cols >= n_cols only where asked to check."""
    if CHECK_ROWS:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        else:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if CHECK_COLS:
            x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


# Philox's multiplies as inline PTX: on NVIDIA GPUs, not in Triton's CPU interpreter (which cannot run PTX) nor
# on ROCm. Decided at import from what the package was built for, without touching a GPU.
_PTX_MUL_WIDE = tl.constexpr(not INTERPRETED and torch.version.hip is None)


@triton.jit
def _wide_product(c, MULTIPLIER: tl.constexpr, VISIBLE: tl.constexpr):
    """(low, high) 32-bit halves of the 64-bit product of uint32 ``c`` and ``MULTIPLIER``.

    One ``mul.wide.u32`` yields both. Written as a 64-bit product, LLVM (Triton 3.6-3.8's, at times 3.9's)
    splits some of Philox's into a ``mul.hi.u32`` and a 64-bit ``mul.lo``, two SASS multiplies where one
    IMAD.WIDE.U32 does; inline PTX pins the one, except where VISIBLE asks for the product LLVM can see through
    (Philox's last round, whose low halves it multiplies by shifted constants to align the dropout bytes).
    Both forms compute the same values: the Random123 known-answer test runs the plain one in the interpreter
    and the PTX one on CUDA.
    """
    if _PTX_MUL_WIDE and not VISIBLE:
        lo, hi = tl.inline_asm_elementwise(
            "{ .reg .b64 t; mul.wide.u32 t, $2, $3; mov.b64 {$0, $1}, t; }",
            "=r,=r,r,r",
            [c, tl.full(c.shape, MULTIPLIER, tl.uint32)],
            dtype=(tl.uint32, tl.uint32),
            is_pure=True,
            pack=1,
        )
    else:
        p = c.to(tl.uint64) * MULTIPLIER
        lo, hi = p.to(tl.uint32), (p >> 32).to(tl.uint32)
    return lo, hi


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Random123's philox4x32_10, what tl.philox computes) of uint32 counters under key (k0, k1).

    Each round's two 32x32-bit products are taken whole, one IMAD.WIDE.U32 each that yields both halves
    (:func:`_wide_product`), where tl.philox's separate high and low multiplies cost two instructions.
    """
    for i in tl.static_range(10):
        lo0, hi0 = _wide_product(c0, 0xD2511F53, i == 9)
        lo2, hi2 = _wide_product(c2, 0xCD9E8D57, i == 9)
        c0, c1, c2, c3 = hi2 ^ c1 ^ k0, lo2, hi0 ^ c3 ^ k1, lo0
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _dropout_keep(seed, bh, start_m, start_n, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  KEYS_FIRST: tl.constexpr):
    """Keep-mask (True = kept) of the attention-matrix elements (rows start_m + [0, BLOCK_M), keys start_n +
    [0, BLOCK_N)) of head bh: (BLOCK_M, BLOCK_N), or (BLOCK_N, BLOCK_M) when KEYS_FIRST (the dk/dv kernel's
    transposed tiles). start_m and start_n must be multiples of BLOCK_M and BLOCK_N.

    Counter-based, so the forward, the backward and the debug kernel regenerate the same mask whatever their
    tiles. 8-bit uniforms, as in FlashAttention-2: one Philox4x32-10 call serves 16 elements (a call per
    element, 3 of its 4 words unused, made the RNG cost more than the rest of the kernel; a call per 8 elements
    with 16-bit uniforms still doubled the forward's key loop). The call keyed by (seed, head) at counter
    (i // 16 * 8 + i % 8, j // 64, j // 32 % 2 * 4 + j % 8 // 2, 0) serves the 2 x 8 elements (i, j) with that
    counter: rows i0 and i0 + 8 (i0 % 16 < 8) x keys j0 + 8a + b (a < 4, b < 2; j0 % 32 < 8, even), element
    (i, j) taking byte i // 8 % 2 * 2 + j % 2 of word j // 8 % 4. That block matches the MMA accumulator
    layout, where a thread holds rows 8 apart and column pairs 8 apart: in the forward and dq tiles a thread's
    2 rows x 16 keys take 2 calls, in dk/dv's transposed tiles its 2 keys x 8 queries take 4 (one row per call
    would take 8), and the compiler finds the identical calls in one thread and makes them one. The key span
    j // 64, the only counter that changes from one key tile to the next, is shared by a thread's calls. Kept
    when the byte is >= t = round(256 * dropout_p): the drop rate is t / 256, which the launchers make
    dropout_p itself (:func:`dropout_rate`), so that 1 / (1 - dropout_p) keeps the expectation exact.
    """
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32) ^ bh.to(tl.uint32)
    n = tl.arange(0, BLOCK_N)
    if BLOCK_N % 64 == 0:  # start_n is a multiple of 64: keep it out of the per-register terms
        span = start_n // 64 + n // 64
        sub = n // 32 % 2 * 4 + n % 8 // 2
    elif BLOCK_N == 32:  # start_n is a multiple of 32: the tile is one half of one span
        span = tl.zeros_like(n) + start_n // 64
        sub = start_n // 32 % 2 * 4 + n % 8 // 2
    else:
        n = start_n + n
        span = n // 64
        sub = n // 32 % 2 * 4 + n % 8 // 2
    word = n // 8 % 4
    low_key = 1 - n % 2
    m = tl.arange(0, BLOCK_M)
    if BLOCK_M % 16 == 0:
        pair = start_m // 16 * 8 + m // 16 * 8 + m % 8  # rows r and r + 8 share a call
    else:
        m = start_m + m
        pair = m // 16 * 8 + m % 8
    low_row = 1 - m // 8 % 2
    if KEYS_FIRST:
        span, sub, word, low_key = span[:, None], sub[:, None], word[:, None], low_key[:, None]
        row, low_row = pair[None, :], low_row[None, :]
    else:
        span, sub, word, low_key = span[None, :], sub[None, :], word[None, :], low_key[None, :]
        row, low_row = pair[:, None], low_row[:, None]
    shift = (low_row * 16 + low_key * 8).to(tl.uint32)  # 24 - 8 * the byte (rows // 8 % 2 * 2 + key % 2)
    zero = tl.zeros_like(span + row).to(tl.uint32)
    row, span, sub = row.to(tl.uint32) + zero, span.to(tl.uint32) + zero, sub.to(tl.uint32) + zero
    r0, r1, r2, r3 = _philox(row, span, sub, zero, k0, k1)
    r = tl.where(word < 2, tl.where(word == 0, r0, r1), tl.where(word == 2, r2, r3))
    # byte >= t  <=>  (word shifted or rotated to bring the byte to the top) >= t << 24: no byte is extracted.
    # Words 1 and 3 are the low halves of the last products, and the shift folds into the multiply (one
    # IMAD by C << s). Words 0 and 2 are XORs: a shift would let LLVM narrow the earlier rounds' multiplies
    # once per byte, while a rotation (one SHF) needs every bit of the word.
    t = tl.minimum(tl.cast(dropout_p * 256.0 + 0.5, tl.uint32), 255) << 24
    top = r << shift
    return tl.where(word % 2 == 0, top | (r >> ((32 - shift) % 32)), top) >= t


@triton.jit
def _program_tile(n_rows, BLOCK: tl.constexpr, LONGEST_LAST: tl.constexpr):
    """(first row of this program's tile, batch*head index) in the 1-D grid of cdiv(n_rows, BLOCK) * B*H programs.

    One grid axis, tile-major, because axes 1 and 2 stop at 65535 (B*H can exceed that) while axis 0 takes
    2**31 - 1. With LONGEST_LAST the tiles are numbered from the end: under the causal mask the last query tiles
    are the longest, and starting them first balances the tail of the launch.
    """
    n_tiles = tl.cdiv(n_rows, BLOCK)
    n_bh = tl.num_programs(0) // n_tiles
    pid = tl.program_id(0)
    tile = pid // n_bh
    if LONGEST_LAST:
        tile = n_tiles - 1 - tile
    return tile * BLOCK, pid % n_bh


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,  # running output (BLOCK_M, BLOCK_D) fp32, row sum and row max (BLOCK_M,), q tile
    k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,  # this head's k and v
    offs_m, offs_d, lo, hi,  # query rows of the tile; key range [lo, hi) to visit
    start_m, T_K, shift, qk_scale, seed, bh, dropout_p,  # start_m: the tile's first row, offs_m[0]
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MASK: tl.constexpr,  # apply the causal mask and the key bound (diagonal / last tiles)
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(k_base + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                       offs_n, T_K, offs_d, HEAD_DIM, MASK, HEAD_PAD)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASK:
            visible = offs_n[None, :] < T_K
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + shift)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 is visible to every row and comes first
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)  # normalisation before dropout, like PyTorch
        acc = acc * alpha[:, None]
        if DROPOUT:
            # Dropped scores take a zero LLVM cannot see as a constant (dropout_p * 0.0, computed once): with a
            # literal 0 it moves the select after the fp16 conversion, where each element costs two more
            # instructions (unpacking and repacking the fp16 pairs).
            keep = _dropout_keep(seed, bh, start_m, start_n, dropout_p, BLOCK_M, BLOCK_N, False)
            p = tl.where(keep, p, dropout_p * 0.0)
        v = _load_tile(v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                       offs_n, T_K, offs_d, HEAD_DIM, MASK, HEAD_PAD)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, SEED,  # O: (B, H, Tq, D) output; LSE: (B, H, Tq) fp32; SEED: (1,) int64, read if DROPOUT
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T_Q, T_K,  # heads, query and key lengths
    qk_scale, dropout_p,  # softmax scale * log2(e); drop rate, a multiple of 1/256 (dropout_rate)
    T_Q_BUCKET, T_K_BUCKET,  # next_pow2 of the lengths: autotune keys only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m, bh = _program_tile(T_Q, BLOCK_M, True)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                   offs_m, T_Q, offs_d, HEAD_DIM, True, HEAD_PAD)
    if DROPOUT:
        seed = tl.load(SEED)
    else:
        seed = 0

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    shift = T_K - T_Q
    if CAUSAL:
        full_end = (tl.minimum(start_m + shift + 1, T_K) // BLOCK_N) * BLOCK_N  # tiles every row sees whole
        hi = tl.minimum(start_m + BLOCK_M + shift, T_K)  # past the last key any row of the tile sees
    else:
        full_end = (T_K // BLOCK_N) * BLOCK_N
        hi = T_K
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d, 0, full_end,
        start_m, T_K, shift, qk_scale, seed, bh, dropout_p,
        HEAD_DIM, HEAD_PAD, BLOCK_M, BLOCK_N, DOT_PRECISION, False, CAUSAL, DROPOUT,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d, full_end, hi,
        start_m, T_K, shift, qk_scale, seed, bh, dropout_p,
        HEAD_DIM, HEAD_PAD, BLOCK_M, BLOCK_N, DOT_PRECISION, True, CAUSAL, DROPOUT,
    )

    inv_l = 1.0 / l_i
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)  # kept probabilities scaled by 1 / (1 - rate): exact expectation
    acc = acc * inv_l[:, None]
    row_ok = offs_m < T_Q
    # Saved in natural-log units: lse = ln(sum_j exp(scale * q.k_j)) = (m + log2 l) * ln 2.
    tl.store(LSE + bh.to(tl.int64) * T_Q + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=row_ok)
    o_ptrs = o_base + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
    if HEAD_PAD:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _attn_fwd_split_kernel(
    Q, K, V, O_PART, LSE_PART, SEED,  # O_PART: (S, B*H, Tq, BLOCK_D) fp32; LSE_PART: (S, B*H, Tq) fp32, log2 units
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    H, T_Q, T_K, SPLIT,  # SPLIT: keys per split, a multiple of every BLOCK_N
    qk_scale, dropout_p,
    T_Q_BUCKET, T_K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_PAD: tl.constexpr,
    DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Split-KV forward (flash-decoding) for queries that see every key (Tq = 1, or not causal): program
    (query tile * B*H, split) attends to keys [split * SPLIT, (split + 1) * SPLIT) and writes its normalised
    partial output and log-sum-exp; :func:`_attn_combine_kernel` merges the splits. Every split holds at least
    one key, so no row's maximum is -inf.
    """
    start_m, bh = _program_tile(T_Q, BLOCK_M, False)
    split = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                   offs_m, T_Q, offs_d, HEAD_DIM, True, HEAD_PAD)
    if DROPOUT:
        seed = tl.load(SEED)
    else:
        seed = 0
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = split * SPLIT
    hi = tl.minimum(lo + SPLIT, T_K)
    full_end = lo + (hi - lo) // BLOCK_N * BLOCK_N
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d, lo, full_end,
        start_m, T_K, 0, qk_scale, seed, bh, dropout_p,
        HEAD_DIM, HEAD_PAD, BLOCK_M, BLOCK_N, DOT_PRECISION, False, False, DROPOUT,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d, full_end, hi,
        start_m, T_K, 0, qk_scale, seed, bh, dropout_p,
        HEAD_DIM, HEAD_PAD, BLOCK_M, BLOCK_N, DOT_PRECISION, True, False, DROPOUT,
    )
    inv_l = 1.0 / l_i
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    n_bh = tl.num_programs(0) // tl.cdiv(T_Q, BLOCK_M)
    row = (split.to(tl.int64) * n_bh + bh) * T_Q + offs_m  # (split, bh, t)
    row_ok = offs_m < T_Q
    tl.store(LSE_PART + row, m_i + tl.math.log2(l_i), mask=row_ok)
    tl.store(O_PART + row[:, None] * BLOCK_D + offs_d[None, :], acc * inv_l[:, None], mask=row_ok[:, None])


@triton.jit
def _attn_combine_kernel(
    O_PART, LSE_PART, O, LSE,  # partials as written by the split kernel; O (B, H, Tq, D); LSE (B, H, Tq) fp32
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T_Q, N_ROWS, N_SPLITS,  # N_ROWS = B*H*Tq
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """o = sum_s exp(lse_s - lse) o_s with lse = logsumexp_s lse_s, for one query row (B*H*Tq programs)."""
    row = tl.program_id(0).to(tl.int64)  # (bh, t) flattened
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < N_SPLITS
    lse_s = tl.load(LSE_PART + offs_s * N_ROWS + row, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    w = tl.math.exp2(lse_s - m)
    o_s = tl.load(O_PART + (offs_s[:, None] * N_ROWS + row) * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    o = tl.sum(o_s * w[:, None], 0) / tl.sum(w, 0)
    tl.store(LSE + row, (m + tl.math.log2(tl.sum(w, 0))) * 0.6931471805599453)
    bh = row // T_Q
    t = row % T_Q
    o_ptrs = O + (bh // H) * stride_ob + (bh % H) * stride_oh + t * stride_ot + offs_d * stride_od
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta,  # dq accumulator (BLOCK_M, BLOCK_D) fp32; the query tile's q, dO, lse (log2), delta
    k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, offs_d, lo, hi,
    start_m, T_K, shift, qk_scale, seed, bh, dropout_p, keep_scale,  # start_m = offs_m[0]; keep_scale = 1 / (1 - p)
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k = _load_tile(k_base + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                       offs_n, T_K, offs_d, HEAD_DIM, MASK, HEAD_PAD)
        v = _load_tile(v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                       offs_n, T_K, offs_d, HEAD_DIM, MASK, HEAD_PAD)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if MASK:
            visible = offs_n[None, :] < T_K
            if CAUSAL:
                visible = visible & (offs_n[None, :] <= offs_m[:, None] + shift)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, start_m, start_n, dropout_p, BLOCK_M, BLOCK_N, False)
            dp = tl.where(keep, dp, 0.0) * keep_scale  # an FFMA with the "- delta" below
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _row_delta(
    O, DO, DELTA, b, h, bh, offs_m, offs_d,  # b, h: int64 batch and head; bh: the batch*head index
    stride_ob, stride_oh, stride_ot, stride_od, stride_dob, stride_doh, stride_dot, stride_dod,
    T_Q, HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr,
):
    """Loads the query tile's dO and O and stores delta = rowsum(dO * O), the term dS = P * (dP - delta) needs;
    returns (dO tile, delta)."""
    do = _load_tile(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                    offs_m, T_Q, offs_d, HEAD_DIM, True, HEAD_PAD)
    o = _load_tile(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                   offs_m, T_Q, offs_d, HEAD_DIM, True, HEAD_PAD)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * T_Q + offs_m, delta, mask=offs_m < T_Q)
    return do, delta


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, SEED,  # DELTA: (B, H, Tq) fp32, written here for the dk/dv kernel
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T_Q, T_K,
    sm_scale, qk_scale, dropout_p,
    T_Q_BUCKET, T_K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dQ = scale * dS K with dS = P * (dP - delta), dP = dO V^T (times the dropout mask / (1 - p)).

    Also computes delta = rowsum(dO * O) for its query tile, which the dk/dv kernel (launched next) reads.
    """
    start_m, bh = _program_tile(T_Q, BLOCK_M, True)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                   offs_m, T_Q, offs_d, HEAD_DIM, True, HEAD_PAD)
    do, delta = _row_delta(O, DO, DELTA, b, h, bh, offs_m, offs_d, stride_ob, stride_oh, stride_ot, stride_od,
                           stride_dob, stride_doh, stride_dot, stride_dod, T_Q, HEAD_DIM, HEAD_PAD)
    row_ok = offs_m < T_Q
    # Padded rows get lse 0 and dO 0: their dS is 0, so they add nothing and produce no inf/NaN.
    lse = tl.load(LSE + bh.to(tl.int64) * T_Q + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    if DROPOUT:
        seed = tl.load(SEED)
    else:
        seed = 0

    keep_scale = 1.0 / (1.0 - dropout_p)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    shift = T_K - T_Q
    if CAUSAL:
        full_end = (tl.minimum(start_m + shift + 1, T_K) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M + shift, T_K)
    else:
        full_end = (T_K // BLOCK_N) * BLOCK_N
        hi = T_K
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d,
        0, full_end, start_m, T_K, shift, qk_scale, seed, bh, dropout_p, keep_scale,
        HEAD_DIM, HEAD_PAD, BLOCK_M, BLOCK_N, DOT_PRECISION, False, CAUSAL, DROPOUT,
    )
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, offs_m, offs_d,
        full_end, hi, start_m, T_K, shift, qk_scale, seed, bh, dropout_p, keep_scale,
        HEAD_DIM, HEAD_PAD, BLOCK_M, BLOCK_N, DOT_PRECISION, True, CAUSAL, DROPOUT,
    )
    dq = dq * sm_scale
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd
    if HEAD_PAD:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,  # accumulators (BLOCK_N, BLOCK_D) fp32; the key tile's k and v
    q_base, do_base, lse_base, delta_base, stride_qt, stride_qd, stride_dot, stride_dod,
    start_n, offs_n, offs_d, lo, hi,  # key rows of the tile (from start_n); query range [lo, hi) to visit
    T_Q, T_K, shift, qk_scale, seed, bh, dropout_p, keep_scale,  # keep_scale = 1 / (1 - dropout_p)
    HEAD_DIM: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CHECK_M: tl.constexpr,  # bound-check the query rows (last tile, or the diagonal)
    MASK: tl.constexpr,  # apply the causal mask
    DROPOUT: tl.constexpr,
    dq_base, sm_scale,  # this head's fp32 dQ accumulator, (T_Q, BLOCK_D) contiguous; read if ATOMIC_DQ
    BLOCK_D: tl.constexpr,
    ATOMIC_DQ: tl.constexpr,  # also add scale * dS K of each query tile to it (FlashAttention-2's 5 matmuls)
):
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q = _load_tile(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                       offs_m, T_Q, offs_d, HEAD_DIM, CHECK_M, HEAD_PAD)
        do = _load_tile(do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                        offs_m, T_Q, offs_d, HEAD_DIM, CHECK_M, HEAD_PAD)
        # Padded query rows load q = dO = lse = delta = 0: their P is finite and their dS and P^T dO are 0.
        if CHECK_M:
            lse = tl.load(lse_base + offs_m, mask=offs_m < T_Q, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=offs_m < T_Q, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        # Transposed scores (BLOCK_N, BLOCK_M) so that the accumulations below need no transpose of P.
        pt = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
                          - lse[None, :] * 1.4426950408889634)
        if MASK:
            pt = tl.where(offs_n[:, None] <= offs_m[None, :] + shift, pt, 0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, start_m, start_n, dropout_p, BLOCK_M, BLOCK_N, True)
            pzt = tl.where(keep, pt, dropout_p * 0.0)  # a zero kept in fp32 (see _attn_fwd_inner); dv scaled last
            dpt = tl.where(keep, dpt, 0.0) * keep_scale  # an FFMA with the "- delta" below
        else:
            pzt = pt
        dv = tl.dot(pzt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk = tl.dot(dst, q, dk, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            # This key tile's share of dQ for the query tile: the dq kernel would recompute P and dP for it (two
            # more matmuls). Rows past T_Q carry dS = 0 (above); the additions race only with other key tiles.
            dq = tl.dot(tl.trans(dst), k, input_precision=DOT_PRECISION) * sm_scale
            dq_ptrs = dq_base + offs_m[:, None] * BLOCK_D + offs_d[None, :]
            if CHECK_M:
                tl.atomic_add(dq_ptrs, dq, mask=offs_m[:, None] < T_Q, sem="relaxed")
            else:
                tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, DQ, LSE, DELTA, SEED,  # DQ: (B, H, T_Q, BLOCK_D) fp32 zeros, read if ATOMIC_DQ
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    H, T_Q, T_K,
    sm_scale, qk_scale, dropout_p,
    T_Q_BUCKET, T_K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dV = (P * Z)^T dO and dK = scale * dS^T Q for one key tile, looping over the query tiles that see it;
    with ATOMIC_DQ also dQ += scale * dS K for each of those query tiles (atomic fp32 additions into DQ).

    Z is the dropout mask / (1 - p) (all ones without dropout). Keys past T_K are computed but never stored.
    """
    start_n, bh = _program_tile(T_K, BLOCK_N, False)  # the first key tiles are the longest under the causal mask
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse_base = LSE + bh.to(tl.int64) * T_Q
    delta_base = DELTA + bh.to(tl.int64) * T_Q
    dq_base = DQ + bh.to(tl.int64) * T_Q * BLOCK_D

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                   offs_n, T_K, offs_d, HEAD_DIM, True, HEAD_PAD)
    v = _load_tile(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                   offs_n, T_K, offs_d, HEAD_DIM, True, HEAD_PAD)
    if DROPOUT:
        seed = tl.load(SEED)
    else:
        seed = 0

    keep_scale = 1.0 / (1.0 - dropout_p)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    shift = T_K - T_Q
    full_q_end = (T_Q // BLOCK_M) * BLOCK_M
    if CAUSAL:
        # Query i sees key j iff i >= j - shift: start at the first tile holding a row that sees start_n, and
        # mask until the first tile whose rows all see the tile's last key.
        lo = (tl.maximum(start_n - shift, 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qd, stride_dot, stride_dod,
            start_n, offs_n, offs_d, lo, tl.minimum(mid, T_Q),
            T_Q, T_K, shift, qk_scale, seed, bh, dropout_p, keep_scale,
            HEAD_DIM, HEAD_PAD, BLOCK_M, BLOCK_N, DOT_PRECISION, True, True, DROPOUT,
            dq_base, sm_scale, BLOCK_D, ATOMIC_DQ,
        )
    else:
        mid = 0
    # Tiles every row of which sees every key of this tile: no mask, no bound check...
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qd, stride_dot, stride_dod,
        start_n, offs_n, offs_d, mid, full_q_end, T_Q, T_K, shift, qk_scale, seed, bh, dropout_p, keep_scale,
        HEAD_DIM, HEAD_PAD, BLOCK_M, BLOCK_N, DOT_PRECISION, False, False, DROPOUT,
        dq_base, sm_scale, BLOCK_D, ATOMIC_DQ,
    )
    # ...then the last, partial query tile (if the masked loop has not covered it).
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_qd, stride_dot, stride_dod,
        start_n, offs_n, offs_d, tl.maximum(mid, full_q_end), T_Q,
        T_Q, T_K, shift, qk_scale, seed, bh, dropout_p, keep_scale,
        HEAD_DIM, HEAD_PAD, BLOCK_M, BLOCK_N, DOT_PRECISION, True, False, DROPOUT,
        dq_base, sm_scale, BLOCK_D, ATOMIC_DQ,
    )

    dk = dk * sm_scale
    if DROPOUT:
        dv = dv * keep_scale  # the kept P's scale, taken out of the loop
    col_ok = offs_d[None, :] < HEAD_DIM
    row_ok = offs_n[:, None] < T_K
    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd
    if HEAD_PAD:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=row_ok & col_ok)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=row_ok & col_ok)
    else:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=row_ok)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=row_ok)


@triton.jit
def _attn_bwd_prep_kernel(
    O, DO, DELTA, DQ,  # DELTA: (B, H, T_Q) fp32; DQ: (B, H, T_Q, BLOCK_D) fp32, zeroed here
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) of one query tile (which the dq kernel computes for itself), and the zeros that the
    dk/dv kernel's atomic dQ starts from."""
    start_m, bh = _program_tile(T_Q, BLOCK_M, False)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    _row_delta(O, DO, DELTA, b, h, bh, offs_m, offs_d, stride_ob, stride_oh, stride_ot, stride_od,
               stride_dob, stride_doh, stride_dot, stride_dod, T_Q, HEAD_DIM, HEAD_PAD)
    dq_ptrs = DQ + (bh.to(tl.int64) * T_Q + offs_m[:, None]) * BLOCK_D + offs_d[None, :]
    tl.store(dq_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), mask=(offs_m < T_Q)[:, None])


@triton.jit
def _dropout_mask_kernel(
    SEED, MASK,  # MASK: (B, H, Tq, Tk) int8, 1 = kept
    T_Q, T_K, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Debug: write the keep-mask that the attention kernels use for this seed and shape."""
    start_m, bh = _program_tile(T_Q, BLOCK_M, False)  # grid: (query tiles * B*H, key tiles)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(SEED), bh, start_m, tl.program_id(1) * BLOCK_N, dropout_p, BLOCK_M, BLOCK_N, False)
    ptrs = MASK + (bh.to(tl.int64) * T_Q + offs_m[:, None]) * T_K + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < T_Q) & (offs_n[None, :] < T_K))
# fmt: on


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------


# Autotune configs of each kernel, (BLOCK_M, BLOCK_N, num_warps, num_stages), with the largest BLOCK_D each takes
# for 16-bit inputs without dropout, for 16-bit inputs with dropout, and for fp32 (0: never). The limits come from
# compiling every config at its limit for sm_90 and sm_80 with Triton 3.9 and 3.6 (registers, spills, shared
# memory): no selectable config spills registers or needs more shared memory than sm_80's 163 KB. Past these limits
# the tiles spill: dropout's RNG and the dk/dv kernel's two fp32 accumulators take registers, and fp32 without TF32
# (FMA dots that hold whole rows of both operands) takes so many that it gets its own small tile with room for
# D = 128.
_CONFIGS = {
    "fwd": {
        (128, 64, 8, 3): (128, 64, 0),  # FA2's forward tile
        (128, 32, 8, 3): (128, 128, 0),
        # Dropout at D = 64 spilled 8 B at 255 registers with Triton 3.6 (sm_80, bf16, 8-bit RNG): up to D = 32.
        (64, 64, 4, 3): (128, 32, 0),
        (64, 32, 4, 3): (128, 128, 0),
        (16, 64, 4, 3): (128, 128, 0),  # decoding (Tq = 1)
        # With the 8-bit dropout RNG it spilled 72 B at D = 16 with dropout (sm_90, 255 registers): no dropout.
        (16, 128, 4, 2): (128, 0, 0),
        (16, 32, 8, 2): (0, 0, 128),  # fp32
    },
    "dq": {
        (128, 64, 8, 3): (64, 64, 0),
        # With the 8-bit dropout RNG (two Philox calls per thread and iteration) these two spilled on sm_80 with
        # dropout (32 B at D = 128, 64 B at D = 64 bf16): their dropout limits are one head-size class lower.
        (128, 32, 8, 3): (128, 64, 0),
        (64, 64, 4, 3): (128, 32, 0),
        (64, 32, 4, 3): (128, 128, 0),
        (16, 16, 4, 2): (0, 0, 128),  # fp32 (16 x 32 spills 240 B at D = 128 on sm_90)
    },
    "dkdv": {
        (32, 128, 8, 3): (64, 64, 0),
        (64, 64, 8, 3): (128, 0, 0),
        # Spills at D = 96 (padded to 128) on sm_80; with dropout 8 B at D = 64 (bf16, sm_80, 8-bit RNG).
        (32, 64, 4, 3): (64, 32, 0),
        # With dropout at D = 128 (sm_80): 255 registers, 0 B spilled with Triton 3.9 but 8-16 B with 3.6 at any
        # maxnreg; 16 x 32 takes that case. With the 8-bit RNG also 8 B at D = 48 (sm_80), which no head-size limit
        # separates from D = 64: dropout up to D = 32.
        (16, 64, 4, 2): (128, 32, 0),
        (16, 32, 4, 2): (128, 128, 0),
        (16, 16, 4, 2): (0, 0, 128),  # fp32
    },
    # The dk/dv kernel with the 5-matmul backward's atomic dQ (ATOMIC_DQ): the same tiles, with the (BLOCK_M,
    # BLOCK_D) fp32 share of dQ of each query tile on top of dk and dv. 16-bit inputs only: fp32's tile spilled at
    # D = 64 with dropout whatever the register cap (sm_90 16 B at 255, sm_80 8 B uncapped; Triton 3.9), and fp32
    # is not a speed target, so fp32 takes the dq kernel (attention_bwd).
    "dkdv_dq": {
        (32, 128, 8, 3): (64, 64, 0),
        (64, 64, 8, 3): (32, 0, 0),  # spills 16 B at D = 64 on sm_80 (bf16, capped or not)
        # Triton 3.7 spills 8 B at D = 48 (sm_80, 16-bit, no dropout) with or without a register cap.
        (32, 64, 4, 3): (32 if TRITON_VERSION[:2] == (3, 7) else 64, 32, 0),
        (16, 64, 4, 2): (128, 32, 0),
        (16, 32, 4, 2): (128, 128, 0),
        (16, 16, 4, 2): (0, 0, 0),
    },
    "split": {
        (16, 32, 4, 3): (128, 128, 0),
        (16, 64, 4, 3): (128, 128, 0),
        (16, 128, 4, 2): (128, 128, 0),
        (16, 16, 4, 2): (0, 0, 128),  # fp32
    },
}
# Tiles whose register cap depends on the head size, with the largest BLOCK_D that gets maxnreg at the whole budget
# (0: none); above it ptxas chooses. aot_check --full (Triton 3.9, sm_80 and sm_90) compiled each at every head size
# both ways: at 255 registers they spill 8-56 B a thread at large D (sm_80: fwd 128 x 64 and 128 x 32 at D = 128,
# fwd and dq 64 x 64 at D = 64; both archs: dkdv's fp32 tile at D = 128 with dropout), while without a cap ptxas
# settles for 64-128 registers and spills 8-24 B at small D (sm_80 with dropout: fwd 128 x 64 at D = 8, fwd 64 x 64
# at D = 32, dkdv's fp32 tile at D = 16 and 32; sm_90: dkdv's fp32 tile at D = 8 and 16 without dropout). The same
# choice is spill-free with Triton 3.6 (aot_check --full, sm_80 and sm_90), which honours maxnreg as 3.9 does.
_PTXAS_CHOOSES_REGISTERS = {
    ("fwd", (128, 64, 8, 3)): 64,
    # Triton 3.7 uncapped spills 16 B at D <= 16 (sm_80, aot_check --full); 3.6, 3.8 and 3.9 do not.
    ("fwd", (128, 32, 8, 3)): 16 if TRITON_VERSION[:2] == (3, 7) else 0,
    ("fwd", (64, 64, 4, 3)): 32,
    ("dq", (64, 64, 4, 3)): 0,
    # With the 8-bit dropout RNG at D = 64 with dropout (sm_90), Triton 3.9 spills 16 B at 255 registers and none
    # uncapped, Triton 3.6 the other way round (8 B uncapped): the cap depends on the version. 3.8 takes 3.9's
    # choice spill-free (aot_check --full); 3.7 did too until Philox's multiplies became inline PTX, after which
    # it spilled 8 B uncapped and none capped, as 3.6 does.
    ("dkdv", (16, 16, 4, 2)): 64 if TRITON_VERSION <= (3, 7) else 32,
}
_SMALL_PROBLEM = 256 * 256  # Tq * Tk up to this: the smallest tile, without benchmarking


def _tile(config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _maxnreg(kernel: str, tile: tuple[int, int, int, int], block_d: int) -> int | None:
    """The launch option ``maxnreg`` of ``tile`` at this BLOCK_D: the whole per-thread budget (without it ptxas
    settles for a low register target on some tiles, 64-168 registers, and spills 8-24 bytes a thread; Triton 3.9,
    sm_80 and sm_90), except above the head sizes of :data:`_PTXAS_CHOOSES_REGISTERS` (None: ptxas chooses)."""
    if block_d > _PTXAS_CHOOSES_REGISTERS.get((kernel, tile), block_d):
        return None
    return max_registers(tile[2])


_LISTED_BLOCK_D = 64  # the autotuner's config list carries the caps of D = 64 (GPT-2); the prune sets the others


def _configs(kernel: str) -> list:
    return [
        triton.Config(
            {"BLOCK_M": m, "BLOCK_N": n},
            num_warps=w,
            num_stages=s,
            maxnreg=_maxnreg(kernel, (m, n, w, s), _LISTED_BLOCK_D),
        )
        for m, n, w, s in _CONFIGS[kernel]
    ]


def _fits(kernel: str, config, block_d: int, dropout: bool, fp32: bool) -> bool:
    """Whether ``config`` of ``kernel`` compiles without spills and within shared memory at this size."""
    return block_d <= _CONFIGS[kernel][_tile(config)][2 if fp32 else 1 if dropout else 0]


def _with_registers(kernel: str, config, block_d: int):
    """``config`` with the register cap of this BLOCK_D (:func:`_maxnreg`): the autotuner's configs are fixed
    objects, so a tile whose cap at this head size differs from the listed one launches as a copy."""
    maxnreg = _maxnreg(kernel, _tile(config), block_d)
    if maxnreg == config.maxnreg:
        return config
    return triton.Config(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages, maxnreg=maxnreg)


def _prune_tiles(kernel: str):
    """Autotune pre-filter of ``kernel``'s configs.

    Keeps the configs that fit the head size, dtype and dropout (:data:`_CONFIGS`), then skips those whose row tile
    is longer than the rows there are (decoding's Tq = 1). Small problems (Tq * Tk <= 256 * 256) and fp32 (not a
    speed target) take the smallest tile without benchmarking, so that test suites on a GPU do not compile every
    config for every shape. The kept configs carry the register cap of this head size (:func:`_with_registers`;
    the autotune key includes HEAD_DIM, so each head size is pruned on its own).
    """
    bucket, block = ("T_K_BUCKET", "BLOCK_N") if kernel.startswith("dkdv") else ("T_Q_BUCKET", "BLOCK_M")

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        name = "dkdv_dq" if kernel == "dkdv" and args["ATOMIC_DQ"] else kernel  # the limits of this variant
        fp32 = args["Q"].dtype == torch.float32
        fit = [c for c in configs if _fits(name, c, args["BLOCK_D"], args["DROPOUT"], fp32)]
        kept = [c for c in fit if c.kwargs[block] <= args[bucket]] or fit
        if kept and (fp32 or args["T_Q_BUCKET"] * args["T_K_BUCKET"] <= _SMALL_PROBLEM):  # none: dkdv_dq's fp32
            kept = [min(kept, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
        return [_with_registers(name, c, args["BLOCK_D"]) for c in kept]

    return {"early_config_prune": prune}


def selectable_configs(kernel: str, head_dim: int, dtype: torch.dtype, dropout: bool) -> list:
    """The configs of ``kernel`` ("fwd", "dq", "dkdv", "dkdv_dq": dkdv with the atomic dQ, "split") that the
    autotuner may pick for some lengths at this head size, dtype and dropout: what an ahead-of-time compile check
    must compile."""
    prune = _prune_tiles(kernel)["early_config_prune"]
    q = torch.empty(0, dtype=dtype, device="meta")
    block_d = max(16, next_power_of_2(head_dim))
    picked = []
    for tq, tk in [(16, 16), (16, 2**20), (2**20, 2**20)] + [(2**i, 2**i) for i in range(4, 12)]:
        args = dict(BLOCK_D=block_d, DROPOUT=dropout, T_Q_BUCKET=tq, T_K_BUCKET=tk, ATOMIC_DQ=False)
        for c in prune(_configs(kernel), {"Q": q}, **args):
            if c not in picked:
                picked.append(c)
    return picked


_TUNE_KEY = ["T_Q_BUCKET", "T_K_BUCKET", "HEAD_DIM", "CAUSAL", "DROPOUT"]


if INTERPRETED:
    # The interpreter would run every config on the CPU: fixed, small tiles instead (BLOCK_M != BLOCK_N so that
    # the tests exercise the split between masked and unmasked tiles).
    _attn_fwd = _attn_fwd_kernel
    _attn_bwd_dq = _attn_bwd_dq_kernel
    _attn_bwd_dkdv = _attn_bwd_dkdv_kernel
    _attn_fwd_split = _attn_fwd_split_kernel
    _INTERPRETER_TILES = {"fwd": (32, 16), "dq": (32, 16), "dkdv": (16, 32), "split": (16, 32)}
else:
    _attn_fwd = triton.autotune(_configs("fwd"), key=_TUNE_KEY, prune_configs_by=_prune_tiles("fwd"))(_attn_fwd_kernel)
    _attn_bwd_dq = triton.autotune(_configs("dq"), key=_TUNE_KEY, prune_configs_by=_prune_tiles("dq"))(
        _attn_bwd_dq_kernel
    )
    # DQ accumulates: zeroed before each config's timing and once more after tuning, before the real launch.
    _attn_bwd_dkdv = triton.autotune(
        _configs("dkdv"), key=[*_TUNE_KEY, "ATOMIC_DQ"], prune_configs_by=_prune_tiles("dkdv"), reset_to_zero=["DQ"]
    )(_attn_bwd_dkdv_kernel)
    _attn_fwd_split = triton.autotune(
        _configs("split"),
        key=["T_Q_BUCKET", "T_K_BUCKET", "HEAD_DIM", "DROPOUT"],
        prune_configs_by=_prune_tiles("split"),
    )(_attn_fwd_split_kernel)


_MAX_GRID_X = 2**31 - 1  # CUDA's limit on grid axis 0 (axes 1 and 2 stop at 65535)


def _grid(n_rows: int, tile: int, bh: int) -> tuple[int]:
    """The 1-D grid of one program per (row tile, batch*head) that :func:`_program_tile` decodes."""
    n = triton.cdiv(n_rows, tile) * bh
    if n > _MAX_GRID_X:
        raise ValueError(f"attention: {n} programs ({n_rows} rows in tiles of {tile}, B*H={bh}) exceed CUDA's grid")
    return (n,)


def _launch(kernel, which: str, n_rows: int, bh: int, args: tuple, meta: dict, splits: int = 1) -> None:
    """Launch over (row tiles, batch*heads[, key splits]): fixed tiles in the interpreter, autotuned ones on the
    GPU; a kernel with one tile of its own (``meta`` holds its BLOCK_M) the same everywhere."""
    extra = (splits,) if splits > 1 else ()
    with device_guard(args[0]):
        if INTERPRETED and which in _INTERPRETER_TILES:
            block_m, block_n = _INTERPRETER_TILES[which]
            tile = block_m if which != "dkdv" else block_n
            kernel[(*_grid(n_rows, tile, bh), *extra)](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n)
        else:
            row_block = "BLOCK_N" if which == "dkdv" else "BLOCK_M"
            kernel[lambda cfg: (*_grid(n_rows, cfg[row_block], bh), *extra)](*args, **meta)


_PREP_ROWS = 64  # query rows per program of the backward's pre-pass
_SPLIT_CHUNK = 128  # keys per split are a multiple of this, and so of every BLOCK_N of the split kernel
_SPLIT_MAX_TQ = 16  # the split kernel's query tile: one tile of queries that all see every key
_INTERPRETER_SMS = 8  # the interpreter pretends to be a small GPU, so that the tests take the split path


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_SMS


def _kv_splits(programs: int, tk: int, n_sms: int) -> tuple[int, int]:
    """(number of splits, keys per split) of the keys for a forward launch of ``programs`` programs.

    Flash-decoding: decoding (Tq = 1) launches only B*H programs, a few SMs' worth at batch 1, each walking all Tk
    keys; splitting the keys gives about two programs per SM, each with at least _SPLIT_CHUNK keys. (1, tk) when
    the launch already fills the GPU or the keys are few.
    """
    if programs >= n_sms or tk < 2 * _SPLIT_CHUNK:
        return 1, tk
    want = min(triton.cdiv(2 * n_sms, programs), tk // _SPLIT_CHUNK)
    size = triton.cdiv(triton.cdiv(tk, want), _SPLIT_CHUNK) * _SPLIT_CHUNK
    return triton.cdiv(tk, size), size


def _meta(q: torch.Tensor, k: torch.Tensor, causal: bool, dropout_p: float) -> dict:
    """The kernels' constexpr and autotune-key arguments (cached: they depend on a few integers only)."""
    fp32_dots = q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    return _meta_for(q.shape[2], k.shape[2], q.shape[3], causal, dropout_p > 0.0, fp32_dots)


@functools.lru_cache(maxsize=1024)
def _meta_for(tq: int, tk: int, d: int, causal: bool, dropout: bool, fp32_dots: bool) -> dict:
    block_d = max(16, next_power_of_2(d))
    return dict(
        # At least 16, so that short lengths (decoding's Tq = 1) share one key and one integer specialisation.
        T_Q_BUCKET=max(16, next_power_of_2(tq)),
        T_K_BUCKET=max(16, next_power_of_2(tk)),
        HEAD_DIM=d,
        BLOCK_D=block_d,
        HEAD_PAD=block_d != d,
        CAUSAL=causal,
        DROPOUT=dropout,
        # fp32 inputs: TF32 tensor cores where PyTorch's matmuls may use them (torch.backends.cuda.matmul.allow_tf32),
        # exact fp32 otherwise (TF32 would miss the fp32 tolerance). fp16/bf16 dots ignore the setting.
        DOT_PRECISION="ieee" if fp32_dots else "tf32",
    )


def _check_seed(seed: torch.Tensor | None, q: torch.Tensor, dropout_p: float) -> None:
    if dropout_p > 0.0 and (seed is None or seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != q.device):
        raise ValueError(f"attention: dropout needs seed, a (1,) int64 tensor on {q.device}; got {seed!r}")


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seed: torch.Tensor | None,
    causal: bool,
    dropout_p: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel.

    Args:
        q: (B, H, Tq, D); k, v: (B, H, Tk, D); any strides. seed: (1,) int64 on q's device, needed when
        ``dropout_p > 0``; the kernels drop at :func:`dropout_rate` of ``dropout_p``. scale: softmax scale.
    Returns:
        o (B, H, Tq, D) in q's dtype, contiguous; lse (B, H, Tq) fp32, the natural log-sum-exp of the scaled
        (masked) scores of each row, before dropout.
    """
    _check_seed(seed, q, dropout_p)
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    # sizes as separate arguments: a tuple costs the parser ~0.8 us more (torch 2.13)
    o = q.new_empty(B, H, Tq, D)
    lse = q.new_empty(B, H, Tq, dtype=torch.float32)
    meta = _meta(q, k, causal, dropout_p)
    seed_ptr = seed if seed is not None else lse  # not read without dropout
    splits, split = (1, Tk) if Tq > _SPLIT_MAX_TQ or (causal and Tq > 1) else _kv_splits(B * H, Tk, _sm_count(q.device))
    if splits > 1:  # every query sees every key: split them across programs, then merge
        o_part = torch.empty(splits, B * H, Tq, meta["BLOCK_D"], dtype=torch.float32, device=q.device)
        lse_part = torch.empty(splits, B * H, Tq, dtype=torch.float32, device=q.device)
        args = (
            q, k, v, o_part, lse_part, seed_ptr, *q.stride(), *k.stride(), *v.stride(),
            H, Tq, Tk, split, scale * _LOG2E, dropout_rate(dropout_p),
        )  # fmt: skip
        split_meta = {key: value for key, value in meta.items() if key != "CAUSAL"}
        _launch(_attn_fwd_split, "split", Tq, B * H, args, split_meta, splits)
        with device_guard(q):
            _attn_combine_kernel[(B * H * Tq,)](
                o_part, lse_part, o, lse, *o.stride(), H, Tq, B * H * Tq, splits,
                HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], BLOCK_S=next_power_of_2(splits),
            )  # fmt: skip
        _backend.record("attention_fwd_split")
    else:
        args = (
            q, k, v, o, lse, seed_ptr, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
            H, Tq, Tk, scale * _LOG2E, dropout_rate(dropout_p),
        )  # fmt: skip
        _launch(_attn_fwd, "fwd", Tq, B * H, args, meta)
    _backend.record("attention_fwd")
    return o, lse


def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    seed: torch.Tensor | None,
    causal: bool,
    dropout_p: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the backward kernels, recomputing P from ``lse``.

    For fp16 and bf16, FlashAttention-2's 5-matmul backward: a pre-pass computes delta = rowsum(dO * O) and
    zeroes an fp32 dQ, then one kernel per key tile computes dK and dV and adds each query tile's share of dQ
    atomically. The order of those fp32 additions varies from run to run, so under
    ``torch.use_deterministic_algorithms(True)``, and for fp32 inputs (not a speed target; their tile has no
    registers to spare), the 7-matmul backward runs instead: a dq kernel per query tile (recomputing P and dP),
    then the dk/dv kernel.

    Args:
        do: (B, H, Tq, D) gradient of the output, any strides; q, k, v, seed, causal, dropout_p, scale as given
        to :func:`attention_fwd`; o, lse: what it returned.
    Returns:
        dq (B, H, Tq, D), dk and dv (B, H, Tk, D), contiguous, in q's dtype.
    """
    _check_seed(seed, q, dropout_p)
    if _span(do) >= _MAX_SPAN:  # a strange layout of the upstream gradient: copy rather than overflow
        do = do.contiguous()
    B, H, Tq, D = q.shape
    Tk = k.shape[2]
    dk = torch.empty(B, H, Tk, D, dtype=q.dtype, device=q.device)
    dv = torch.empty(B, H, Tk, D, dtype=q.dtype, device=q.device)
    delta = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    lse = lse.contiguous()
    seed = seed if seed is not None else lse
    meta = _meta(q, k, causal, dropout_p)
    scalars = (H, Tq, Tk, scale, scale * _LOG2E, dropout_rate(dropout_p))
    atomic = q.dtype != torch.float32 and not torch.are_deterministic_algorithms_enabled()
    if atomic:
        dq_acc = torch.empty(B, H, Tq, meta["BLOCK_D"], dtype=torch.float32, device=q.device)
        prep_meta = dict(HEAD_DIM=D, BLOCK_D=meta["BLOCK_D"], HEAD_PAD=meta["HEAD_PAD"])
        prep_args = (o, do, delta, dq_acc, *o.stride(), *do.stride(), H, Tq)
        _launch(_attn_bwd_prep_kernel, "prep", Tq, B * H, prep_args, prep_meta | {"BLOCK_M": _PREP_ROWS})
    else:
        dq = torch.empty(B, H, Tq, D, dtype=q.dtype, device=q.device)
        dq_acc = dk  # not read; the autotuner zeroes it while timing, and the kernel then writes it
        dq_args = (
            q, k, v, o, do, dq, lse, delta, seed,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), *do.stride(), *dq.stride(), *scalars,
        )  # fmt: skip
        _launch(_attn_bwd_dq, "dq", Tq, B * H, dq_args, meta)
    dkdv_args = (
        q, k, v, do, dk, dv, dq_acc, lse, delta, seed,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(), *scalars,
    )  # fmt: skip
    _launch(_attn_bwd_dkdv, "dkdv", Tk, B * H, dkdv_args, {**meta, "ATOMIC_DQ": atomic})
    if atomic:
        dq = dq_acc[..., :D].to(q.dtype).contiguous()  # fp32 at a power-of-two head size: dq_acc itself
        _backend.record("attention_bwd_atomic_dq")
    _backend.record("attention_bwd")
    return dq, dk, dv


def dropout_seed(device: torch.device | str) -> torch.Tensor:
    """Draw the (1,) int64 dropout seed from torch's RNG for ``device`` (so ``torch.manual_seed`` reproduces it)."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def attention_dropout_mask(
    seed: torch.Tensor | int, B: int, H: int, Tq: int, Tk: int, dropout_p: float, device: torch.device | str
) -> torch.Tensor:
    """The (B, H, Tq, Tk) bool keep-mask (True = kept) that the kernels use for ``seed``: a debugging aid.

    Pass it to :func:`attention_reference` as ``dropout_mask`` to reproduce the kernel's dropout.
    """
    reason = _backend.why_not_triton(torch.device(device))
    if reason is not None:
        raise RuntimeError(f"attention_dropout_mask runs the Triton RNG kernel, which cannot run: {reason}")
    if not isinstance(seed, torch.Tensor):
        seed = torch.tensor([int(seed)], dtype=torch.int64)
    seed = seed.to(device=device, dtype=torch.int64).reshape(1)
    mask = torch.empty((B, H, Tq, Tk), dtype=torch.int8, device=device)
    block = 32
    grid = (*_grid(Tq, block, B * H), triton.cdiv(Tk, block))
    with device_guard(mask):
        _dropout_mask_kernel[grid](seed, mask, Tq, Tk, dropout_rate(dropout_p), BLOCK_M=block, BLOCK_N=block)
    return mask.bool()


# ---------------------------------------------------------------------------------------------------------
# Registration: custom ops (eager, torch.compile, opcheck) with autograd
# ---------------------------------------------------------------------------------------------------------


@torch.library.custom_op("gptkernels::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seed: torch.Tensor | None,
    causal: bool,
    dropout_p: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_fwd(q, k, v, seed, causal, dropout_p, scale)


@_attention_fwd_op.register_fake
def _(q, k, v, seed, causal, dropout_p, scale):
    B, H, Tq, D = q.shape
    return q.new_empty((B, H, Tq, D)), q.new_empty((B, H, Tq), dtype=torch.float32)


@torch.library.custom_op("gptkernels::attention_bwd", mutates_args=())
def _attention_bwd_op(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    seed: torch.Tensor | None,
    causal: bool,
    dropout_p: float,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_bwd(do, q, k, v, o, lse, seed, causal, dropout_p, scale)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, seed, causal, dropout_p, scale):
    return q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(k.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, seed, causal, dropout_p, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, seed)
    ctx.causal, ctx.dropout_p, ctx.scale = causal, dropout_p, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, seed = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(do, q, k, v, o, lse, seed, ctx.causal, ctx.dropout_p, ctx.scale)
    return dq, dk, dv, None, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


_MIN_HEAD_DIM, _MAX_HEAD_DIM = 8, 128


def _check_inputs(q, k, v, causal: bool, dropout_p: float, scale: float | None) -> None:
    """Checks shared by both backends: the clear error at the boundary instead of a failure deep inside."""
    op = "attention"
    common = (  # the usual case in one expression; check_tensor names the problem otherwise
        type(q) is type(k) is type(v) is torch.Tensor
        and q.dtype in FLOAT_DTYPES
        and q.dtype == k.dtype == v.dtype
        and q.dim() == k.dim() == v.dim() == 4
        and q.device == k.device == v.device
    )
    if not common:
        check_tensor(op, "q", q, ndim=4)
        check_tensor(op, "k", k, ndim=4, like=q)
        check_tensor(op, "v", v, ndim=4, like=q)
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"{op}: q (B, H, Tq, D) and k, v (B, H, Tk, D) must agree in B, H and D, "
            f"got q {tuple(q.shape)} and k {tuple(k.shape)}"
        )
    if q.numel() == 0 or k.numel() == 0:
        raise ValueError(f"{op}: q and k must be non-empty, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if causal and q.shape[2] > k.shape[2]:
        raise ValueError(
            f"{op}: causal attention needs Tq <= Tk (the mask is aligned to the end), got Tq={q.shape[2]}, "
            f"Tk={k.shape[2]}"
        )
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)
    ):
        raise ValueError(f"{op}: scale must be a finite float or None, got {scale!r}")


_MAX_SPAN = 2**31  # offsets inside one head are int32 in the kernels (batch and head offsets are int64)


def _span(t: torch.Tensor) -> int:
    """The largest element offset inside one (batch, head) slice of a (B, H, T, D) tensor."""
    return (t.shape[2] - 1) * t.stride(2) + (t.shape[3] - 1) * t.stride(3)


def _small_storage(t: torch.Tensor) -> bool:
    """A tensor whose whole storage holds < 2**31 elements spans less than that (cheaper than :func:`_span`; not
    traceable by dynamo)."""
    return t.untyped_storage().nbytes() < _MAX_SPAN * t.element_size()


def _kernel_cannot_take(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, compiling: bool = False) -> str | None:
    """Why the Triton kernel cannot take these (valid) inputs, or None when it can: where ``auto`` falls back."""
    _, _, tq, d = q.shape
    if not _MIN_HEAD_DIM <= d <= _MAX_HEAD_DIM:
        return f"the Triton kernel supports head sizes D in [{_MIN_HEAD_DIM}, {_MAX_HEAD_DIM}], got D={d}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if (compiling or not _small_storage(t)) and _span(t) >= _MAX_SPAN:
            return f"{name} spans {_span(t)} elements inside one head; the kernel needs < 2**31"
    tk = k.shape[2]
    if max(tq, tk) * d >= _MAX_SPAN:  # the contiguous outputs o, dq, dk, dv
        return f"T * D must be < 2**31 inside one head, got Tq={tq}, Tk={tk}, D={d}"
    return None


def _triton_requested(backend: str | None) -> bool:
    """True when the caller (or GPTKERNELS_BACKEND) asked for the kernel explicitly: refuse instead of falling back."""
    return (backend if backend not in (None, "auto") else _backend.env_backend()) == "triton"


_NOTICED: set[str] = set()


def _fall_back(reason: str) -> None:
    """The ``auto`` backend takes the PyTorch path for inputs the kernel cannot take: say so once per reason."""
    if reason not in _NOTICED:
        _NOTICED.add(reason)
        warnings.warn(f"attention: {reason}; using the PyTorch path", stacklevel=3)


def _interpreter_bf16(q: torch.Tensor, backend: str | None) -> bool:
    """True (auto backend) or an error (triton backend) for bf16 in Triton's CPU interpreter.

    The interpreter computes ``tl.dot`` on bfloat16 wrongly (Triton 3.9), so ``auto`` takes the PyTorch path.
    """
    if not (INTERPRETED and q.dtype == torch.bfloat16 and q.device.type == "cpu"):
        return False
    if _triton_requested(backend):
        raise RuntimeError(
            "attention: Triton's CPU interpreter computes tl.dot on bfloat16 wrongly; use float32/float16, "
            "backend='torch' or a GPU"
        )
    return True


class _EagerAttention(torch.autograd.Function):
    """The custom op's forward and backward without its dispatch, for eager calls on plain tensors. The old-style
    ``forward(ctx, ...)``: with ``setup_context``, ``apply`` binds its arguments through ``inspect`` on every call."""

    @staticmethod
    def forward(ctx, q, k, v, seed, causal: bool, dropout_p: float, scale: float):
        o, lse = attention_fwd(q, k, v, seed, causal, dropout_p, scale)
        ctx.save_for_backward(q, k, v, o, lse, seed)
        ctx.causal, ctx.dropout_p, ctx.scale = causal, dropout_p, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seed = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, seed, ctx.causal, ctx.dropout_p, ctx.scale)
        return dq, dk, dv, None, None, None, None


_attention_apply = _backend.eager_apply(_EagerAttention)


def _attention_triton(q, k, v, causal: bool, dropout_p: float, scale: float, compiling: bool) -> torch.Tensor:
    seed = dropout_seed(q.device) if dropout_p > 0.0 else None
    if compiling or not _backend.is_eager(q):  # traced, a dispatch mode or transform, or a FakeTensor...
        return _attention_fwd_op(q, k, v, seed, causal, dropout_p, scale)[0]
    # Eager: the custom op's dispatch costs more host time than the rest of the call (issue 10, item 6).
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _attention_apply(q, k, v, seed, causal, dropout_p, scale)
    return attention_fwd(q, k, v, seed, causal, dropout_p, scale)[0]


# ---------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    dropout_p: float = 0.0,
    scale: float | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention, flash style.

    Args:
        q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tq <= Tk (the causal mask is aligned to the end).
        causal: mask future keys. dropout_p: attention dropout in [0, 1) (pass 0.0 in eval); the Triton kernel
            draws its seed from torch's RNG, so ``torch.manual_seed`` reproduces it. Its RNG has 8-bit
            uniforms (FlashAttention-2's), so it drops at a multiple of 1/256, within 1/512 of ``dropout_p``
            (:func:`dropout_rate`: 0 < p < 1/512 drops 1/256, never nothing; p > 511/512 drops 255/256), and
            scales kept scores by 1 / (1 - that rate), which keeps the output's expectation exact.
        scale: softmax scale, default 1/sqrt(D).
        backend: "auto" | "triton" | "torch" or None (the ``GPTKERNELS_BACKEND`` default). The Triton kernel
            takes fp32/fp16/bf16 and head sizes 8 to 128, and any strides; for other inputs "auto" takes the
            PyTorch path (with one warning per reason) and "triton" raises ``ValueError``.
    Returns:
        (B, H, Tq, D), the dtype of ``q``.
    """
    _check_inputs(q, k, v, causal, dropout_p, scale)
    causal, dropout_p = bool(causal), float(dropout_p)
    compiling = torch.compiler.is_compiling()
    if use_triton("attention", q.device, backend):
        reason = _kernel_cannot_take(q, k, v, compiling)
        if reason is not None:
            if _triton_requested(backend):
                raise ValueError(f"attention: {reason} (use backend='torch' or 'auto')")
            _fall_back(reason)
        elif not _interpreter_bf16(q, backend):
            scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
            return _attention_triton(q, k, v, causal, dropout_p, scale, compiling)
    return attention_torch(q, k, v, causal, dropout_p, scale)
