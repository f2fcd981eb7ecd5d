// Token sampling, CPU: repetition penalty -> temperature -> top-k -> top-p -> min-p -> one draw per row.
//
// Declares the op schema once (TORCH_LIBRARY) and registers the CPU kernel; sampling_cuda.cu registers the CUDA
// one. The Python wrapper (gptkernels/sampling.py) validates Python arguments, draws one uniform per row from the
// caller's generator and calls torch.ops.gptkernels.sample_tokens.
//
// Per row (rows in parallel with at::parallel_for), with x = penalised logits / temperature and m = max x:
//   top-k  threshold = the k-th largest x, by a size-k heap (small k) or std::nth_element; ties at it are kept;
//   top-p  threshold = the largest x whose upper set {x' >= x} holds at least ceil(p * Z_k) of the mass, found by
//          a 3-way quickselect on mass over the few candidates that can matter (never a sort of the vocabulary);
//   min-p  keeps w >= min_p where w = exp(x - m) (= prob / max prob);
//   draw   first kept token, in id order, whose prefix mass exceeds u * Z.
// Masses are int64 fixed point (see sampling.h), so the kept set and the drawn token are exactly those of the
// PyTorch reference and of the CUDA kernel for the same uniforms.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "sampling.h"

// The hot loops get an AVX2 clone picked at load time (the default clone runs anywhere). No FMA either way:
// -ffp-contract=off keeps the results bit-identical across clones and to the reference.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GK_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define GK_CLONES
#endif
#if defined(__GNUC__) || defined(__clang__)
#define GK_INLINE inline __attribute__((always_inline))
#else
#define GK_INLINE inline
#endif

namespace gptkernels {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kHeapMaxK = 256;  // above this top-k uses std::nth_element
constexpr int64_t kBlock = 128;     // logits per block: block masses for the draw, block maxima to skip work

// Per-thread buffers, kept between calls (a 50257-token row is 200 KB: no malloc per row).
struct Scratch {
  std::vector<float> x, w, tmp, sel;
  std::vector<int64_t> blocks;
  std::vector<std::pair<float, int64_t>> cand;
};
thread_local Scratch t_scratch;

// ---- vectorised passes over a row -------------------------------------------------------------------------------
// GCC/Clang vector extensions: 8 float lanes (one AVX2 register in the AVX2 clone, two SSE ones otherwise), every
// lane doing exactly the IEEE operations of the scalar code in sampling.h, so both give identical bits.

#if defined(__GNUC__) || defined(__clang__)
#define GK_VECTOR 1
constexpr int64_t kLanes = 8;
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));

GK_INLINE vf8 vload(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
GK_INLINE void vstore(float* p, vf8 v) { std::memcpy(p, &v, sizeof v); }
GK_INLINE vf8 vsplat(float a) { return vf8{} + a; }

// exp_nonpos of sampling.h, lane-wise.
GK_INLINE vf8 exp_nonpos_v(vf8 t) {
  const vi8 fine = t >= kExpMin;
  t = fine ? t : vsplat(kExpMin);
  vf8 fx = t * kLog2e;
  fx = (fx + kRoundMagic) - kRoundMagic;
  vf8 r = t - fx * kLn2Hi;
  r = r - fx * kLn2Lo;
  vf8 p = r * kP0 + kP1;
  p = p * r + kP2;
  p = p * r + kP3;
  p = p * r + kP4;
  p = p * r + kP5;
  p = p * (r * r) + r + 1.0f;
  const vi8 n = __builtin_convertvector(fx, vi8);
  const vf8 y = p * reinterpret_cast<vf8>((n + 127) << 23);
  return fine ? y : vf8{};
}

// Exact sums of to_fixed(w, scale) = trunc(w * 2^s) without float -> int64 conversions (AVX2 has none): f = w * 2^s
// (< 2^62, 24 significant bits) splits exactly into a * 2^40 + b * 2^20 + c with a, b, c < 2^22, summed in int32
// lanes (a block of kBlock / kLanes = 16 values per lane cannot overflow) and combined in int64 per block.
struct FixedAcc {
  vi8 a{}, b{}, c{};
  GK_INLINE void add(vf8 w, float scale) {
    const vf8 f = w * scale;
    const vi8 ia = __builtin_convertvector(f * 0x1p-40f, vi8);
    const vf8 r = f - __builtin_convertvector(ia, vf8) * 0x1p40f;
    const vi8 ib = __builtin_convertvector(r * 0x1p-20f, vi8);
    const vi8 ic = __builtin_convertvector(r - __builtin_convertvector(ib, vf8) * 0x1p20f, vi8);
    a += ia;
    b += ib;
    c += ic;
  }
  GK_INLINE int64_t total() const {
    int64_t sa = 0, sb = 0, sc = 0;
    for (int64_t l = 0; l < kLanes; ++l) {
      sa += a[l];
      sb += b[l];
      sc += c[l];
    }
    return (sa << 40) + (sb << 20) + sc;
  }
};

GK_INLINE bool any_lane(vi8 m) {
  int64_t q[4];
  std::memcpy(q, &m, sizeof q);
  return (q[0] | q[1] | q[2] | q[3]) != 0;
}
#endif

// Calls f(j) for every j with x[j] >= lo, skipping groups of 8 where no lane qualifies.
template <class F>
GK_INLINE void for_each_at_least(const float* __restrict__ x, int64_t n, float lo, F&& f) {
  int64_t j = 0;
#if GK_VECTOR
  for (; j + kLanes <= n; j += kLanes) {
    if (!any_lane(vload(x + j) >= lo)) continue;
    for (int64_t i = j; i < j + kLanes; ++i)
      if (x[i] >= lo) f(i);
  }
#endif
  for (; j < n; ++j)
    if (x[j] >= lo) f(j);
}

GK_INLINE float max_of(const float* __restrict__ x, int64_t n) {
  float m = -kInf;
  int64_t j = 0;
#if GK_VECTOR
  vf8 vm = vsplat(-kInf);
  for (; j + kLanes <= n; j += kLanes) {
    const vf8 v = vload(x + j);
    vm = v > vm ? v : vm;
  }
  for (int64_t l = 0; l < kLanes; ++l) m = vm[l] > m ? vm[l] : m;
#endif
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

template <typename scalar_t>
void load_row(const scalar_t* __restrict__ src, float* __restrict__ x, int64_t n, bool* nan, bool* pinf) {
  bool any_nan = false, any_pinf = false;
  for (int64_t j = 0; j < n; ++j) {
    const float v = static_cast<float>(src[j]);
    x[j] = v;
    any_nan |= v != v;
    any_pinf |= v == kInf;
  }
  *nan = any_nan;
  *pinf = any_pinf;
}

#if GK_VECTOR
template <>
GK_CLONES void load_row<float>(const float* __restrict__ src, float* __restrict__ x, int64_t n, bool* nan,
                               bool* pinf) {
  vi8 vnan{}, vpinf{};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vf8 v = vload(src + j);
    vstore(x + j, v);
    vnan |= v != v;
    vpinf |= v == kInf;
  }
  bool any_nan = false, any_pinf = false;
  for (int64_t l = 0; l < kLanes; ++l) {
    any_nan |= vnan[l] != 0;
    any_pinf |= vpinf[l] != 0;
  }
  for (; j < n; ++j) {
    x[j] = src[j];
    any_nan |= src[j] != src[j];
    any_pinf |= src[j] == kInf;
  }
  *nan = any_nan;
  *pinf = any_pinf;
}
#endif

GK_CLONES float row_max(const float* __restrict__ x, int64_t n) { return max_of(x, n); }

GK_CLONES float divide_and_max(float* __restrict__ x, int64_t n, float t) {
  float m = -kInf;
  int64_t j = 0;
#if GK_VECTOR
  vf8 vm = vsplat(-kInf);
  for (; j + kLanes <= n; j += kLanes) {
    const vf8 v = vload(x + j) / t;
    vstore(x + j, v);
    vm = v > vm ? v : vm;
  }
  for (int64_t l = 0; l < kLanes; ++l) m = vm[l] > m ? vm[l] : m;
#endif
  for (; j < n; ++j) {
    x[j] = x[j] / t;
    m = x[j] > m ? x[j] : m;
  }
  return m;
}

// w[j] = exp(x[j] - m) where x[j] >= tau, else 0; blocks[b] = fixed mass of block b. Returns the total mass.
GK_CLONES int64_t exp_pass(const float* __restrict__ x, float* __restrict__ w, int64_t n, float m, float tau,
                           float scale, int64_t* __restrict__ blocks) {
  int64_t total = 0;
  for (int64_t j0 = 0, b = 0; j0 < n; j0 += kBlock, ++b) {
    const int64_t j1 = std::min(j0 + kBlock, n);
    if (tau > -kInf && max_of(x + j0, j1 - j0) < tau) {  // nothing kept here (top-k, min-p): skip the exps
      std::fill(w + j0, w + j1, 0.0f);
      blocks[b] = 0;
      continue;
    }
    int64_t j = j0, s = 0;
#if GK_VECTOR
    FixedAcc acc;
    for (; j + kLanes <= j1; j += kLanes) {
      const vf8 xv = vload(x + j);
      const vf8 wv = xv >= tau ? exp_nonpos_v(xv - m) : vf8{};
      vstore(w + j, wv);
      acc.add(wv, scale);
    }
    s = acc.total();
#endif
    for (; j < j1; ++j) {
      w[j] = x[j] >= tau ? exp_nonpos(x[j] - m) : 0.0f;
      s += to_fixed(w[j], scale);
    }
    blocks[b] = s;
    total += s;
  }
  return total;
}

// blocks[b] = fixed mass of the tokens of block b with x >= tau and w >= min_p. Returns the total mass.
GK_CLONES int64_t kept_mass(const float* __restrict__ x, const float* __restrict__ w, int64_t n, float tau,
                            float min_p, float scale, int64_t* __restrict__ blocks) {
  int64_t total = 0;
  for (int64_t j0 = 0, b = 0; j0 < n; j0 += kBlock, ++b) {
    const int64_t j1 = std::min(j0 + kBlock, n);
    int64_t j = j0, s = 0;
#if GK_VECTOR
    FixedAcc acc;
    for (; j + kLanes <= j1; j += kLanes) {
      const vf8 xv = vload(x + j), wv = vload(w + j);
      acc.add((xv >= tau) & (wv >= min_p) ? wv : vf8{}, scale);
    }
    s = acc.total();
#endif
    for (; j < j1; ++j) s += x[j] >= tau && w[j] >= min_p ? to_fixed(w[j], scale) : 0;
    blocks[b] = s;
    total += s;
  }
  return total;
}

// (x, fixed mass) of the tokens with x >= lo and positive mass; returns their total mass.
GK_CLONES int64_t collect(const float* __restrict__ x, const float* __restrict__ w, int64_t n, float lo, float scale,
                          std::vector<std::pair<float, int64_t>>& out) {
  out.clear();
  int64_t total = 0;
  for_each_at_least(x, n, lo, [&](int64_t j) {
    const int64_t f = to_fixed(w[j], scale);
    if (f > 0) {
      out.emplace_back(x[j], f);
      total += f;
    }
  });
  return total;
}

GK_CLONES void collect_values(const float* __restrict__ x, int64_t n, float lo, std::vector<float>& out) {
  out.clear();
  for_each_at_least(x, n, lo, [&](int64_t j) { out.push_back(x[j]); });
}

// ---- selection ----------------------------------------------------------------------------------------------

// The k-th largest of x[0..n) (1 <= k < n), counting repeated values.
float kth_largest(const float* x, int64_t n, int64_t k, Scratch& sc) {
  if (k > kHeapMaxK) {
    // A strided sample gives a value a little below the k-th largest; select among the few values above it.
    constexpr int64_t kSample = 1024;
    if (n >= 16 * kSample) {
      const int64_t stride = n / kSample;
      sc.tmp.resize(kSample);
      for (int64_t i = 0; i < kSample; ++i) sc.tmp[i] = x[i * stride];
      const int64_t rank = std::min<int64_t>(kSample - 1, (k * kSample / n) * 5 / 4 + 16);
      std::nth_element(sc.tmp.begin(), sc.tmp.begin() + rank, sc.tmp.end(), std::greater<float>());
      collect_values(x, n, sc.tmp[rank], sc.sel);
      if (static_cast<int64_t>(sc.sel.size()) >= k) {
        std::nth_element(sc.sel.begin(), sc.sel.begin() + (k - 1), sc.sel.end(), std::greater<float>());
        return sc.sel[k - 1];
      }
    }
    sc.tmp.assign(x, x + n);
    std::nth_element(sc.tmp.begin(), sc.tmp.begin() + (k - 1), sc.tmp.end(), std::greater<float>());
    return sc.tmp[k - 1];
  }
  // Min-heap of the k largest so far; a block whose max does not beat the heap's minimum is skipped.
  std::vector<float>& heap = sc.tmp;
  heap.assign(x, x + k);
  std::make_heap(heap.begin(), heap.end(), std::greater<float>());
  for (int64_t j0 = k; j0 < n; j0 += kBlock) {
    const int64_t j1 = std::min(j0 + kBlock, n);
    if (row_max(x + j0, j1 - j0) <= heap.front()) continue;
    for (int64_t j = j0; j < j1; ++j) {
      if (x[j] > heap.front()) {
        std::pop_heap(heap.begin(), heap.end(), std::greater<float>());
        heap.back() = x[j];
        std::push_heap(heap.begin(), heap.end(), std::greater<float>());
      }
    }
  }
  return heap.front();
}

// The largest value v such that the candidates with x >= v hold at least `need` mass (sum of all >= need).
// 3-way quickselect on mass: expected O(n), ties handled as one group.
float select_by_mass(std::vector<std::pair<float, int64_t>>& a, int64_t need) {
  size_t lo = 0, hi = a.size();
  int64_t acc = 0;  // mass of the candidates above [lo, hi)
  while (hi - lo > 24) {
    const float p0 = a[lo].first, p1 = a[lo + (hi - lo) / 2].first, p2 = a[hi - 1].first;
    const float pivot = std::max(std::min(p0, p1), std::min(std::max(p0, p1), p2));  // median of three
    size_t lt = lo, i = lo, gt = hi;  // [lo, lt) > pivot, [lt, i) == pivot, [gt, hi) < pivot
    int64_t above = 0, equal = 0;
    while (i < gt) {
      const float v = a[i].first;
      if (v > pivot) {
        above += a[i].second;
        std::swap(a[lt++], a[i++]);
      } else if (v < pivot) {
        std::swap(a[i], a[--gt]);
      } else {
        equal += a[i++].second;
      }
    }
    if (acc + above >= need) {
      hi = lt;
    } else if (acc + above + equal >= need) {
      return pivot;
    } else {
      acc += above + equal;
      lo = gt;
    }
  }
  std::sort(a.begin() + lo, a.begin() + hi, [](const auto& p, const auto& q) { return p.first > q.first; });
  for (size_t i = lo; i < hi;) {
    const float v = a[i].first;
    while (i < hi && a[i].first == v) acc += a[i++].second;
    if (acc >= need) return v;
  }
  return -kInf;  // unreachable when the candidates hold >= need
}

// The top-p threshold over the top-k set (weights w, zero outside it, total fixed mass z_k). Only tokens at or above
// a cut are searched: tokens below cut_p hold at most half of the 1 - p tail, so they cannot be in the set; the
// mass check falls back to the exact lower bound if the cut was ever too high. Below cut_m every token fails min-p,
// so if the threshold lies there top-p binds nothing and -inf is returned.
float top_p_threshold(const float* x, const float* w, int64_t n, float top_p, int64_t z_k, int64_t n_k, float m,
                      float tau_k, float cut_m, float scale, Scratch& sc) {
  const int64_t need = top_p_need(top_p, z_k);
  const double tail = 0.5 * (1.0 - static_cast<double>(top_p)) * static_cast<double>(z_k) /
                      (static_cast<double>(scale) * static_cast<double>(std::max<int64_t>(n_k, 1)));
  const float cut_p = static_cast<float>(static_cast<double>(m) + std::log(tail));
  const float lo_exact = std::max(tau_k, cut_m);
  for (const float lo : {std::max(lo_exact, cut_p), lo_exact}) {
    if (collect(x, w, n, lo, scale, sc.cand) >= need) return select_by_mass(sc.cand, need);
    if (lo <= lo_exact) break;
  }
  return -kInf;
}

// ---- one row --------------------------------------------------------------------------------------------------

struct RowOut {
  int64_t token = -1;
  float logprob = std::numeric_limits<float>::quiet_NaN();
};

template <typename scalar_t>
int32_t sample_row(const scalar_t* logits, int64_t V, const double* prm, const int64_t* prev, int64_t n_prev,
                   double u, RowOut& out) {
  int32_t st = check_params(prm[kTemperature], prm[kTopK], prm[kTopP], prm[kMinP], prm[kPenalty], u);
  if (st != kOk) return st;
  const float temperature = static_cast<float>(prm[kTemperature]);
  const int64_t top_k = static_cast<int64_t>(std::min(prm[kTopK], static_cast<double>(V)));
  const float top_p = static_cast<float>(prm[kTopP]);
  const float min_p = static_cast<float>(prm[kMinP]);
  const float penalty = static_cast<float>(prm[kPenalty]);
  const bool greedy = temperature == 0.0f || top_k == 1;

  Scratch& sc = t_scratch;
  sc.x.resize(V);
  float* x = sc.x.data();
  bool nan = false, pinf = false;
  load_row(logits, x, V, &nan, &pinf);
  for (int64_t i = 0; i < n_prev; ++i) {
    const int64_t t = prev[i];
    if (t < 0 || t >= V) return kPrevOutOfRange;
    // From the original logit, so a token repeated in prev_tokens is penalised once.
    x[t] = apply_penalty(static_cast<float>(logits[t]), penalty);
  }
  if (nan) return kNaN;
  if (pinf) return kPosInf;

  if (greedy) {  // argmax of the penalised logits, first index on ties
    const float m = row_max(x, V);
    if (m == -kInf) return kNoFinite;
    if (m == kInf) return kTemperatureOverflow;
    out.token = std::find(x, x + V, m) - x;
    out.logprob = 0.0f;
    return kOk;
  }
  const float m = temperature == 1.0f ? row_max(x, V) : divide_and_max(x, V, temperature);
  if (m == -kInf) return kNoFinite;
  if (m == kInf) return kTemperatureOverflow;

  const int shift = mass_shift(V);
  const float scale = std::ldexp(1.0f, shift);
  const bool use_k = top_k > 1 && top_k < V, use_p = top_p < 1.0f, use_min_p = min_p > 0.0f;
  sc.w.resize(V);
  sc.blocks.resize((V + kBlock - 1) / kBlock);
  float* w = sc.w.data();
  int64_t* blocks = sc.blocks.data();

  const float tau_k = use_k ? kth_largest(x, V, top_k, sc) : -kInf;
  // exp_nonpos is within ~1e-7 of exp, far inside the 1e-3 margin: every token below cut_m fails min-p.
  const float cut_m =
      use_min_p ? static_cast<float>(static_cast<double>(m) + std::log(static_cast<double>(min_p)) - 1e-3) : -kInf;
  // Weights of the top-k set (top-p needs its whole mass), or only of the tokens that can pass min-p.
  int64_t z = exp_pass(x, w, V, m, use_p ? tau_k : std::max(tau_k, cut_m), scale, blocks);
  float tau_p = -kInf;
  if (use_p) {
    tau_p = top_p_threshold(x, w, V, top_p, z, use_k ? top_k : V, m, tau_k, cut_m, scale, sc);
  }
  if (use_p || use_min_p) z = kept_mass(x, w, V, tau_p, min_p, scale, blocks);

  // The draw: the first kept token, in id order, whose prefix mass exceeds the target.
  const int64_t target = sample_target(u, z);
  int64_t cum = 0, b = 0;
  while (cum + blocks[b] <= target) cum += blocks[b++];
  for (int64_t j = b * kBlock; j < std::min((b + 1) * kBlock, V); ++j) {
    if (x[j] >= tau_p && w[j] >= min_p) {
      cum += to_fixed(w[j], scale);
      if (cum > target) {
        out.token = j;
        out.logprob = log_prob(x[j], m, z, shift);
        return kOk;
      }
    }
  }
  return kNoFinite;  // unreachable: the most likely token always survives with mass 2^shift
}

}  // namespace

void check_inputs(const at::Tensor& logits, const at::Tensor& uniforms, c10::ArrayRef<double> params,
                  const std::optional<at::Tensor>& row_params, const std::optional<at::Tensor>& prev_tokens,
                  c10::DeviceType device) {
  TORCH_CHECK(logits.device().type() == device, "sample_tokens: logits must be on ", device);
  TORCH_CHECK_VALUE(logits.dim() == 2, "sample_tokens: logits must be (B, V), got ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
                   "sample_tokens: logits must be float32, float16, bfloat16 or float64, got ", dt);
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(V >= 1 && V < (int64_t(1) << 31), "sample_tokens: vocab size must be in [1, 2^31), got ", V);
  TORCH_CHECK_TYPE(uniforms.scalar_type() == at::kDouble, "sample_tokens: uniforms must be float64");
  TORCH_CHECK_VALUE(uniforms.dim() == 1 && uniforms.size(0) == B, "sample_tokens: uniforms must be (B,)");
  TORCH_CHECK(uniforms.device() == logits.device(), "sample_tokens: uniforms must be on the logits' device");
  TORCH_CHECK_VALUE(params.size() == kNumParams, "sample_tokens: params must hold 5 numbers, got ", params.size());
  if (row_params.has_value()) {
    const at::Tensor& p = *row_params;
    TORCH_CHECK_TYPE(p.scalar_type() == at::kDouble, "sample_tokens: row_params must be float64");
    TORCH_CHECK_VALUE(p.dim() == 2 && p.size(0) == B && p.size(1) == kNumParams,
                      "sample_tokens: row_params must be (B, 5), got ", p.sizes());
    TORCH_CHECK(p.device() == logits.device(), "sample_tokens: row_params must be on the logits' device");
  }
  if (prev_tokens.has_value()) {
    const at::Tensor& p = *prev_tokens;
    TORCH_CHECK_TYPE(p.scalar_type() == at::kLong, "sample_tokens: prev_tokens must be int64");
    TORCH_CHECK_VALUE(p.dim() == 2 && p.size(0) == B, "sample_tokens: prev_tokens must be (B, T), got ", p.sizes());
    TORCH_CHECK(p.device() == logits.device(), "sample_tokens: prev_tokens must be on the logits' device");
  }
}

namespace {

// ---- the op ---------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> sample_tokens_cpu(const at::Tensor& logits_in, const at::Tensor& uniforms_in,
                                                     c10::ArrayRef<double> params,
                                                     const std::optional<at::Tensor>& row_params_in,
                                                     const std::optional<at::Tensor>& prev_in, bool check) {
  check_inputs(logits_in, uniforms_in, params, row_params_in, prev_in, c10::DeviceType::CPU);
  // Rows may be strided (logits[:, -1, :] of a (B, T, V) output): only the vocabulary must be contiguous.
  const at::Tensor logits = logits_in.stride(1) == 1 ? logits_in : logits_in.contiguous();
  const int64_t row_stride = logits.stride(0);
  const at::Tensor uniforms = uniforms_in.contiguous();
  const at::Tensor row_params = row_params_in.has_value() ? row_params_in->contiguous() : at::Tensor();
  const at::Tensor prev = prev_in.has_value() ? prev_in->contiguous() : at::Tensor();
  const int64_t B = logits.size(0), V = logits.size(1);
  const int64_t n_prev = prev.defined() ? prev.size(1) : 0;

  at::Tensor ids = at::empty({B}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({B}, logits.options().dtype(at::kFloat));
  std::vector<int32_t> status(B, kOk);
  int64_t* ids_p = ids.data_ptr<int64_t>();
  float* lp_p = logprobs.data_ptr<float>();
  const double* u_p = uniforms.data_ptr<double>();
  const double* row_prm_p = row_params.defined() ? row_params.data_ptr<double>() : nullptr;
  const int64_t* prev_p = prev.defined() ? prev.data_ptr<int64_t>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gptkernels_sample_cpu", [&] {
    const scalar_t* l_p = logits.data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        RowOut out;
        const double* prm = row_prm_p ? row_prm_p + r * kNumParams : params.data();
        status[r] = sample_row<scalar_t>(l_p + r * row_stride, V, prm,
                                         prev_p ? prev_p + r * n_prev : nullptr, n_prev, u_p[r], out);
        ids_p[r] = status[r] == kOk ? out.token : -static_cast<int64_t>(status[r]);
        lp_p[r] = out.logprob;
      }
    });
  });
  if (check) {
    for (int64_t r = 0; r < B; ++r)
      TORCH_CHECK_VALUE(status[r] == kOk, "sample: row ", r, ": ", status_message(status[r]));
  }
  return {ids, logprobs};
}

}  // namespace
}  // namespace gptkernels

TORCH_LIBRARY(gptkernels, m) {
  // params: temperature, top_k, top_p, min_p, repetition_penalty (1, 0, 1, 0, 1 when off) for every row, or per
  // row in row_params, float64 (B, 5). Numbers travel with the launch: no host-to-device copy, no sync.
  // check=False never raises on bad rows (no GPU sync): they get token -(status code, see sampling.h) and a NaN
  // logprob.
  m.def(
      "sample_tokens(Tensor logits, Tensor uniforms, float[] params, Tensor? row_params, Tensor? prev_tokens, "
      "bool check) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gptkernels, CPU, m) { m.impl("sample_tokens", &gptkernels::sample_tokens_cpu); }

PYBIND11_MODULE(_C, m) {
  m.doc() = "gptkernels' compiled ops; importing it registers torch.ops.gptkernels.sample_tokens";
#ifdef GPTKERNELS_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
