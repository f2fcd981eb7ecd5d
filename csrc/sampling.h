// Arithmetic shared by the CPU op (sampling.cpp), the CUDA op (sampling_cuda.cu) and, replayed with torch ops, the
// PyTorch reference (gptkernels/sampling.py). Every step that decides WHICH token is kept or drawn is a fixed
// sequence of IEEE-754 operations, so the three implementations pick the same token for the same uniforms:
//
//   x   = l / T                      float32 division (l: logit after the repetition penalty)
//   w   = exp_nonpos(x - max x)      Cephes' expf polynomial, one rounding per operation, no FMA contraction
//   f   = int64(w * 2^s)             fixed-point mass; integer sums are exact in any order (block reductions too)
//   top-p need = ceil(p * Z_k)       double, Z_k = sum of f over the top-k set
//   target     = int64(u * Z)        double, clamped to Z - 1; the token is the first whose prefix sum exceeds it
//
// Build with -ffp-contract=off (g++) and --fmad=false (nvcc) so no multiply-add is fused behind our back; the
// device code also uses the explicitly rounded intrinsics.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

#ifdef __CUDACC__
#define GK_HD __host__ __device__ __forceinline__
#else
#define GK_HD inline
#endif

namespace gptkernels {

// Order of the 5 sampling parameters (the op's params list and the columns of row_params); disabled filters hold
// their neutral value.
enum Param : int { kTemperature = 0, kTopK = 1, kTopP = 2, kMinP = 3, kPenalty = 4, kNumParams = 5 };

// Row status written by both ops; the first failing check (in this order) wins. With check=False a bad row's id
// is -(status), so the reason travels with the ids (every code is >= 1) and is read back only when needed.
enum Status : int32_t {
  kOk = 0,
  kBadTemperature = 1,
  kBadTopK = 2,
  kBadTopP = 3,
  kBadMinP = 4,
  kBadPenalty = 5,
  kBadUniform = 6,
  kPrevOutOfRange = 7,
  kNaN = 8,
  kPosInf = 9,
  kNoFinite = 10,
  kTemperatureOverflow = 11,
};

inline const char* status_message(int32_t s) {
  switch (s) {
    case kBadTemperature: return "temperature must be finite and >= 0 (0 is greedy)";
    case kBadTopK: return "top_k must be an integer >= 0 (0 disables it)";
    case kBadTopP: return "top_p must be in (0, 1]";
    case kBadMinP: return "min_p must be in [0, 1]";
    case kBadPenalty: return "repetition_penalty must be finite and > 0";
    case kBadUniform: return "uniforms must be in [0, 1)";
    case kPrevOutOfRange: return "prev_tokens holds an id outside [0, vocab_size)";
    case kNaN: return "logits contain NaN";
    case kPosInf: return "logits contain +inf";
    case kNoFinite: return "logits have no finite value (every token is -inf)";
    case kTemperatureOverflow: return "logits / temperature overflows float32; use temperature=0 for greedy";
    default: return "ok";
  }
}

GK_HD float f_add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
GK_HD float f_sub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
GK_HD float f_mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
GK_HD float f_div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
GK_HD double d_mul(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
GK_HD double d_sub(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dsub_rn(a, b);
#else
  return a - b;
#endif
}

GK_HD float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}
GK_HD uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// The repetition penalty of CTRL / Hugging Face: shrink positive logits, push negative ones further down.
GK_HD float apply_penalty(float l, float penalty) { return l > 0.0f ? f_div(l, penalty) : f_mul(l, penalty); }

// Cephes expf constants, written as the exact float32 values (hex) so that Python can use the same numbers.
constexpr float kExpMin = -0x1.5cp+6f;         // -87: below it the result is (treated as) 0
constexpr float kLog2e = 0x1.715476p+0f;       // log2(e)
constexpr float kRoundMagic = 0x1.8p+23f;      // 1.5 * 2^23: (v + M) - M rounds v to the nearest integer
constexpr float kLn2Hi = 0x1.63p-1f;           // 0.693359375
constexpr float kLn2Lo = -0x1.bd0106p-13f;     // ln 2 - kLn2Hi
constexpr float kP0 = 0x1.a0d2cep-13f;
constexpr float kP1 = 0x1.6e879cp-10f;
constexpr float kP2 = 0x1.111210p-7f;
constexpr float kP3 = 0x1.555382p-5f;
constexpr float kP4 = 0x1.555554p-3f;
constexpr float kP5 = 0x1.0p-1f;

// exp(t) for t <= 0 (the weight of a token relative to the most likely one); exp_nonpos(0) == 1 exactly and
// -inf gives 0. Branch-free so that the CPU loop vectorises; about 1 ulp from the true exp.
GK_HD float exp_nonpos(float t) {
  const bool tiny = !(t >= kExpMin);
  t = tiny ? kExpMin : t;
  float fx = f_mul(t, kLog2e);
  fx = f_sub(f_add(fx, kRoundMagic), kRoundMagic);
  float r = f_sub(t, f_mul(fx, kLn2Hi));
  r = f_sub(r, f_mul(fx, kLn2Lo));
  float p = kP0;
  p = f_add(f_mul(p, r), kP1);
  p = f_add(f_mul(p, r), kP2);
  p = f_add(f_mul(p, r), kP3);
  p = f_add(f_mul(p, r), kP4);
  p = f_add(f_mul(p, r), kP5);
  p = f_add(f_add(f_mul(p, f_mul(r, r)), r), 1.0f);
  const int32_t n = static_cast<int32_t>(fx);  // in [-126, 0]
  const float scale = bits_to_float(static_cast<uint32_t>(n + 127) << 23);
  const float y = f_mul(p, scale);
  return tiny ? 0.0f : y;
}

// Fixed-point shift s: masses are int64(w * 2^s) with w <= 1, so a row's total stays below 2^62 for any vocab.
GK_HD int mass_shift(int64_t vocab) {
  int bits = 0;
  while ((int64_t(1) << bits) <= vocab) ++bits;
  return 62 - bits;
}
GK_HD int64_t to_fixed(float w, float scale) { return static_cast<int64_t>(f_mul(w, scale)); }

// The smallest mass the top-p set must reach: ceil(p * Z) in double, within [1, Z].
GK_HD int64_t top_p_need(float top_p, int64_t z) {
  const int64_t need = static_cast<int64_t>(ceil(d_mul(static_cast<double>(top_p), static_cast<double>(z))));
  return need < 1 ? 1 : (need > z ? z : need);
}

// Inverse CDF: the drawn token is the first kept one whose inclusive prefix mass exceeds this.
GK_HD int64_t sample_target(double u, int64_t z) {
  const int64_t t = static_cast<int64_t>(d_mul(u, static_cast<double>(z)));
  return t < z ? t : z - 1;
}

// log p(token) = (x - max x) - log(Z * 2^-s), all in double.
GK_HD float log_prob(float x, float m, int64_t z, int shift) {
  const double log_z = d_sub(log(static_cast<double>(z)), d_mul(static_cast<double>(shift), 0.6931471805599453));
  return static_cast<float>(d_sub(d_sub(static_cast<double>(x), static_cast<double>(m)), log_z));
}

// Validates one row's parameters (temperature and penalty as the float32 values the op uses); kOk or the first
// failing check's status.
GK_HD int32_t check_params(double temperature, double top_k, double top_p, double min_p, double penalty, double u) {
  const float t = static_cast<float>(temperature);
  if (!(t >= 0.0f) || t == INFINITY) return kBadTemperature;
  if (!(top_k >= 0.0) || top_k != floor(top_k)) return kBadTopK;
  if (!(top_p > 0.0 && top_p <= 1.0)) return kBadTopP;
  if (!(min_p >= 0.0 && min_p <= 1.0)) return kBadMinP;
  const float pen = static_cast<float>(penalty);
  if (!(pen > 0.0f) || pen == INFINITY) return kBadPenalty;
  if (!(u >= 0.0 && u < 1.0)) return kBadUniform;
  return kOk;
}

// Shapes, dtypes and devices of the op's arguments (sampling.cpp); TORCH_CHECKs naming the bad one.
void check_inputs(const at::Tensor& logits, const at::Tensor& uniforms, c10::ArrayRef<double> params,
                  const std::optional<at::Tensor>& row_params, const std::optional<at::Tensor>& prev_tokens,
                  c10::DeviceType device);

}  // namespace gptkernels
