// Token sampling, CUDA: the same op as sampling.cpp (schema declared there), one thread block per row.
//
// Per row, over a float32 scratch copy x of the row (penalised, divided by the temperature; it stays in L2):
//   max / argmax         block reduction (cub::BlockReduce), NaN / +inf / range checks with __syncthreads_or;
//   top-k threshold      radix select on the order-preserving uint32 key of x: 4 passes, each a 256-bin shared
//                        histogram of counts and one warp scan of it (no sort);
//   top-p threshold      the same radix select with the bins holding int64 fixed-point masses (integer atomics:
//                        exact, so the result does not depend on the order of the adds; each bin is two 32-bit
//                        words with a carry, because 64-bit shared-memory atomics compile to CAS retry loops);
//   draw                 each thread sums the kept masses of its contiguous chunk, one cub::BlockScan gives the
//                        chunk offsets and the total, and the thread whose chunk holds u * total walks it.
// Every decision uses the IEEE operations of sampling.h, so a row gets the token the CPU op and the PyTorch
// reference give for the same uniform. All launches are on the current stream and checked.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <limits>

#include "sampling.h"

namespace gptkernels {
namespace {

constexpr int kThreads = 512;
constexpr int kWarp = 32;
constexpr int kBins = 256;  // radix digit: 8 bits, 4 passes over a 32-bit key

struct ArgMax {
  float v;
  int i;
};
struct ArgMaxOp {  // larger value, then smaller index: the first maximum, in a fixed order
  __device__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    if (a.v != b.v) return a.v > b.v ? a : b;
    return a.i < b.i ? a : b;
  }
};

// Order-preserving map float -> uint32 (-0.0 folded onto +0.0 so that equal floats get equal keys).
__device__ __forceinline__ uint32_t float_key(float f) {
  const uint32_t u = float_to_bits(f_add(f, 0.0f));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key_float(uint32_t k) {
  return bits_to_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// A 256-bin shared histogram: clear(d), add(bin, w) from any thread, get(d) after a barrier.
template <typename T>
struct Hist {
  T c[kBins];
  __device__ __forceinline__ void clear(int d) { c[d] = 0; }
  __device__ __forceinline__ void add(int b, T w) { atomicAdd(&c[b], w); }
  __device__ __forceinline__ T get(int d) const { return c[d]; }
};

// 64-bit bins as two 32-bit words. sm_80/sm_90 have no native 64-bit shared-memory atomic add (it becomes a
// compare-and-swap retry loop, which serialises on a hot bin); two native 32-bit adds and the carry of the low
// word are exact: each add that wraps the low word returns an old value > its sum and carries exactly once.
template <>
struct Hist<unsigned long long> {
  uint32_t lo[kBins];
  uint32_t hi[kBins];
  __device__ __forceinline__ void clear(int d) { lo[d] = 0, hi[d] = 0; }
  __device__ __forceinline__ void add(int b, unsigned long long w) {
    const uint32_t w_lo = static_cast<uint32_t>(w);
    const uint32_t old = atomicAdd(&lo[b], w_lo);
    const uint32_t w_hi = static_cast<uint32_t>(w >> 32) + (old + w_lo < old ? 1u : 0u);
    if (w_hi != 0) atomicAdd(&hi[b], w_hi);
  }
  __device__ __forceinline__ unsigned long long get(int d) const {
    return (static_cast<unsigned long long>(hi[d]) << 32) | lo[d];
  }
};

template <typename T>
struct RadixShared {
  Hist<T> hist;
  uint32_t digit;
  T above;
  T need;
};

// The key of the largest value v among {x >= lo} such that the elements with x >= v weigh at least `need`
// (weight(x) = 1: the need-th largest value). With need_of_total, `need` is computed from the total weight once the
// first histogram is in (top-p: ceil(p * Z)).
template <typename T, typename Weight, typename NeedOfTotal>
__device__ float radix_select(const float* __restrict__ x, int n, float lo, T need, Weight weight,
                              NeedOfTotal need_of_total, RadixShared<T>& sh) {
  const int tid = threadIdx.x, lane = tid % kWarp;
  uint32_t prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int d = tid; d < kBins; d += kThreads) sh.hist.clear(d);
    __syncthreads();
    for (int j = tid; j < n; j += kThreads) {
      const float v = x[j];
      if (v >= lo) {
        const uint32_t key = float_key(v);
        if ((key & mask) == prefix) {
          const T w = weight(v);
          if (w != 0) sh.hist.add((key >> shift) & (kBins - 1), w);
        }
      }
    }
    __syncthreads();
    if (tid < kWarp) {  // lane l owns digits 255 - 8l ... 248 - 8l, scanned from the top
      T local[kBins / kWarp];
      T lane_sum = 0;
#pragma unroll
      for (int i = 0; i < kBins / kWarp; ++i) {
        local[i] = sh.hist.get(kBins - 1 - (lane * (kBins / kWarp) + i));
        lane_sum += local[i];
      }
      T incl = lane_sum;
#pragma unroll
      for (int off = 1; off < kWarp; off <<= 1) {
        const T o = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += o;
      }
      if (shift == 24) {
        const T total = __shfl_sync(0xffffffffu, incl, kWarp - 1);
        need = need_of_total(total, need);
      }
      const T excl = incl - lane_sum;
      if (excl < need && need <= incl) {
        T acc = excl;
#pragma unroll
        for (int i = 0; i < kBins / kWarp; ++i) {
          if (acc + local[i] >= need) {
            sh.digit = kBins - 1 - (lane * (kBins / kWarp) + i);
            sh.above = acc;
            break;
          }
          acc += local[i];
        }
      }
      if (shift == 24 && lane == 0) sh.need = need;
    }
    __syncthreads();
    if (shift == 24) need = sh.need;  // every thread takes the need computed by the scanning warp
    prefix |= sh.digit << shift;
    mask |= static_cast<uint32_t>(kBins - 1) << shift;
    need -= sh.above;
    __syncthreads();
  }
  return key_float(prefix);
}

struct Params {
  double v[kNumParams];
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(const scalar_t* __restrict__ logits, int64_t logits_row_stride, int vocab,
                  const double* __restrict__ uniforms,
                  Params shared_params, const double* __restrict__ row_params, int64_t row_stride,
                  const int64_t* __restrict__ prev,
                  int64_t n_prev, float* __restrict__ scratch, int64_t* __restrict__ ids, float* __restrict__ logprobs,
                  int32_t* __restrict__ status) {
  using ArgMaxReduce = cub::BlockReduce<ArgMax, kThreads>;
  using MassScan = cub::BlockScan<long long, kThreads>;
  __shared__ union {
    typename ArgMaxReduce::TempStorage reduce;
    typename MassScan::TempStorage scan;
  } temp;
  __shared__ union {
    RadixShared<int> count;
    RadixShared<unsigned long long> mass;
  } radix;
  __shared__ ArgMax best;

  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  const scalar_t* l = logits + row * logits_row_stride;
  float* x = scratch + row * vocab;
  double prm[kNumParams];
#pragma unroll
  for (int i = 0; i < kNumParams; ++i) prm[i] = row_params ? row_params[row * row_stride + i] : shared_params.v[i];
  const double u = uniforms[row];

  auto finish = [&](int32_t st, int64_t token, float lp) {
    if (tid == 0) {
      status[row] = st;
      ids[row] = token;
      logprobs[row] = lp;
    }
  };
  auto fail = [&](int32_t st) { finish(st, -static_cast<int64_t>(st), NAN); };  // id -(status): see sampling.h
  const int32_t bad_param = check_params(prm[kTemperature], prm[kTopK], prm[kTopP], prm[kMinP], prm[kPenalty], u);
  if (bad_param != kOk) return fail(bad_param);
  const float temperature = static_cast<float>(prm[kTemperature]);
  const int64_t top_k = static_cast<int64_t>(fmin(prm[kTopK], static_cast<double>(vocab)));
  const float top_p = static_cast<float>(prm[kTopP]);
  const float min_p = static_cast<float>(prm[kMinP]);
  const float penalty = static_cast<float>(prm[kPenalty]);
  const bool greedy = temperature == 0.0f || top_k == 1;
  const bool divide = !greedy && temperature != 1.0f;

  // x = penalised logits (/ temperature unless greedy), with the data checks.
  bool nan = false, pinf = false, out_of_range = false;
  for (int j = tid; j < vocab; j += kThreads) {
    const float v = static_cast<float>(l[j]);
    nan |= v != v;
    pinf |= v == INFINITY;
    x[j] = divide ? f_div(v, temperature) : v;
  }
  __syncthreads();
  if (prev != nullptr) {
    for (int64_t i = tid; i < n_prev; i += kThreads) {
      const int64_t t = prev[row * n_prev + i];
      if (t < 0 || t >= vocab) {
        out_of_range = true;
      } else {  // from the original logit: an id repeated in prev_tokens is penalised once
        const float v = apply_penalty(static_cast<float>(l[t]), penalty);
        x[t] = divide ? f_div(v, temperature) : v;
      }
    }
  }
  out_of_range = __syncthreads_or(out_of_range);
  nan = __syncthreads_or(nan);
  pinf = __syncthreads_or(pinf);
  if (out_of_range) return fail(kPrevOutOfRange);
  if (nan) return fail(kNaN);
  if (pinf) return fail(kPosInf);

  ArgMax mine{-INFINITY, 0x7fffffff};
  for (int j = tid; j < vocab; j += kThreads) {
    const float v = x[j];
    if (v > mine.v) mine = ArgMax{v, j};  // j grows: the first maximum of this thread's elements
  }
  const ArgMax top = ArgMaxReduce(temp.reduce).Reduce(mine, ArgMaxOp());
  if (tid == 0) best = top;
  __syncthreads();
  const float m = best.v;
  if (m == -INFINITY) return fail(kNoFinite);
  if (m == INFINITY) return fail(kTemperatureOverflow);
  if (greedy) return finish(kOk, best.i, 0.0f);

  const int shift = mass_shift(vocab);
  const float scale = ldexpf(1.0f, shift);
  auto mass = [&](float v) -> unsigned long long {
    return static_cast<unsigned long long>(to_fixed(exp_nonpos(f_sub(v, m)), scale));
  };
  float tau = -INFINITY;
  if (top_k > 1 && top_k < vocab) {
    tau = radix_select<int>(
        x, vocab, -INFINITY, static_cast<int>(top_k), [](float) { return 1; }, [](int, int need) { return need; },
        radix.count);
  }
  if (top_p < 1.0f) {
    const float tau_p = radix_select<unsigned long long>(
        x, vocab, tau, 0ull, mass,
        [&](unsigned long long total, unsigned long long) {
          return static_cast<unsigned long long>(top_p_need(top_p, static_cast<int64_t>(total)));
        },
        radix.mass);
    tau = fmaxf(tau, tau_p);
  }

  // The draw: chunk masses, their exclusive scan, and a walk of the chunk that holds the target. (The scan's
  // barriers order these default outputs before the finding thread's.)
  fail(kNoFinite);
  const int chunk = (vocab + kThreads - 1) / kThreads;   // no overflow: vocab <= INT_MAX - kThreads (host check)
  const int j0 = min(tid * chunk, vocab), j1 = j0 + min(chunk, vocab - j0);  // j0 + chunk may exceed INT_MAX
  long long local = 0;
  for (int j = j0; j < j1; ++j) {
    const float v = x[j];
    if (v >= tau) {
      const float w = exp_nonpos(f_sub(v, m));
      if (w >= min_p) local += to_fixed(w, scale);
    }
  }
  long long before = 0, total = 0;
  MassScan(temp.scan).ExclusiveSum(local, before, total);
  const int64_t target = sample_target(u, total);
  if (local > 0 && before <= target && target < before + local) {
    long long acc = before;
    for (int j = j0; j < j1; ++j) {
      const float v = x[j];
      if (v >= tau) {
        const float w = exp_nonpos(f_sub(v, m));
        if (w >= min_p) {
          acc += to_fixed(w, scale);
          if (acc > target) {
            status[row] = kOk;
            ids[row] = j;
            logprobs[row] = log_prob(v, m, total, shift);
            break;
          }
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> sample_tokens_cuda(const at::Tensor& logits_in, const at::Tensor& uniforms_in,
                                                      c10::ArrayRef<double> params,
                                                      const std::optional<at::Tensor>& row_params_in,
                                                      const std::optional<at::Tensor>& prev_in, bool check) {
  check_inputs(logits_in, uniforms_in, params, row_params_in, prev_in, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  // Rows may be strided (logits[:, -1, :] of a (B, T, V) output): only the vocabulary must be contiguous.
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const at::Tensor uniforms = uniforms_in.contiguous();
  const at::Tensor row_params = row_params_in.has_value() ? row_params_in->contiguous() : at::Tensor();
  Params shared_params;
  for (int i = 0; i < kNumParams; ++i) shared_params.v[i] = params[i];
  const at::Tensor prev = prev_in.has_value() ? prev_in->contiguous() : at::Tensor();
  const int64_t B = logits.size(0), V = logits.size(1);
  const int64_t n_prev = prev.defined() ? prev.size(1) : 0;
  // The kernel's int loops (j += kThreads) must not overflow.
  TORCH_CHECK_VALUE(V <= std::numeric_limits<int>::max() - kThreads,
                    "sample_tokens: vocab size must be at most 2^31 - 513 on CUDA, got ", V);

  at::Tensor ids = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({B}, logits.options().dtype(at::kFloat));
  at::Tensor status = at::empty({B}, logits.options().dtype(at::kInt));
  if (B == 0) return {ids, logprobs};
  at::Tensor scratch = at::empty({B, V}, logits.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gptkernels_sample_cuda", [&] {
    sample_kernel<scalar_t><<<static_cast<unsigned int>(B), kThreads, 0, stream>>>(
        logits.data_ptr<scalar_t>(), logits.stride(0), static_cast<int>(V), uniforms.data_ptr<double>(),
        shared_params, row_params.defined() ? row_params.data_ptr<double>() : nullptr, kNumParams,
        n_prev > 0 ? prev.data_ptr<int64_t>() : nullptr, n_prev, scratch.data_ptr<float>(),
        ids.data_ptr<int64_t>(), logprobs.data_ptr<float>(), status.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (check) {  // the one device sync of a call, to raise on bad data like the CPU op
    const at::Tensor st = status.cpu();
    const int32_t* s = st.data_ptr<int32_t>();
    for (int64_t r = 0; r < B; ++r) TORCH_CHECK_VALUE(s[r] == kOk, "sample: row ", r, ": ", status_message(s[r]));
  }
  return {ids, logprobs};
}

}  // namespace
}  // namespace gptkernels

TORCH_LIBRARY_IMPL(gptkernels, CUDA, m) { m.impl("sample_tokens", &gptkernels::sample_tokens_cuda); }
