// Causal attention within packed documents on CPU, one XLA FFI call per pass: per (example,
// head) the [S, S] scores, softmax and the products with V stay in one thread's buffers, and
// q, k, v, out and their gradients are read and written in place as [B, S, H, Dh] (strided
// sgemm), so none of the transposes, masks and [B, H, S, S] arrays that XLA:CPU builds for
// the same function. (example, head) pairs are spread over threads; f32 only.
//
// Key j is visible to query i when j <= i and seg[j] == seg[i]. The forward pass saves the
// log-sum-exp of each query's scores; the backward pass recomputes the probabilities from it.
// Built by moe/cpu_build.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using F32 = ffi::Buffer<ffi::F32>;
using I32 = ffi::Buffer<ffi::S32>;

namespace {

using moe_cpu::Gemm;
using moe_cpu::Shape;
using moe_cpu::kN;
using moe_cpu::kT;

struct Dims {
  int64_t b, s, h, dh;
  int64_t row() const { return h * dh; }                                  // stride between positions
  int64_t offset(int64_t e, int64_t head) const { return e * s * row() + head * dh; }
};

// "" when q, k, v (and `more`) are [B, S, H, Dh], seg [B, S] and the thread count valid.
std::string Invalid(const F32& q, const F32& k, const F32& v, const I32& seg, int64_t threads,
                    std::initializer_list<const F32*> more = {}) {
  if (std::string why = moe_cpu::ThreadsInvalid(threads); !why.empty()) return why;
  const auto qd = q.dimensions();
  if (qd.size() != 4) return "q must be [B, S, H, Dh], not " + Shape(qd);
  if (!moe_cpu::SameShape(k.dimensions(), qd) || !moe_cpu::SameShape(v.dimensions(), qd))
    return "k " + Shape(k.dimensions()) + " and v " + Shape(v.dimensions()) + " must match q " + Shape(qd);
  for (const F32* a : more)
    if (!moe_cpu::SameShape(a->dimensions(), qd)) return "an array of shape " + Shape(a->dimensions()) + " must match q " + Shape(qd);
  const auto sd = seg.dimensions();
  if (sd.size() != 2 || sd[0] != qd[0] || sd[1] != qd[1])
    return "segment_ids " + Shape(sd) + " must be [B, S] of q " + Shape(qd);
  return "";
}

Dims DimsOf(const F32& q) {
  const auto d = q.dimensions();
  return {d[0], d[1], d[2], d[3]};
}

// p[i, j] = exp(scores[i, j] - lse[i]) where key j is visible to query i, else 0. With
// lse == nullptr the row's log-sum-exp is computed (and written to lse_out).
void Probabilities(float* p, const int32_t* seg, int64_t s, const float* lse, float* lse_out) {
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < s; ++i) {
    float* row = p + i * s;
    const int32_t own = seg[i];
    float m = lse ? lse[i] : kNone;
    if (!lse)
      for (int64_t j = 0; j <= i; ++j) m = std::max(m, seg[j] == own ? row[j] : kNone);
    float sum = 0.f;
    for (int64_t j = 0; j <= i; ++j) {  // branch-free: vectorizes
      const float e = moe_cpu::Exp(row[j] - m);
      row[j] = seg[j] == own ? e : 0.f;
      sum += row[j];
    }
    for (int64_t j = i + 1; j < s; ++j) row[j] = 0.f;
    if (!lse) {
      const float inv = 1.f / sum;
      for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
      lse_out[i] = m + std::log(sum);
    }
  }
}

// Runs fn(example, head, scratch) for every pair, pair p on thread p % threads.
template <typename Fn>
void ForPairs(const Dims& d, int threads, int64_t scratch, Fn fn) {
  moe_cpu::Pool::Get().Run(threads, [&](int tid) {
    std::vector<float> buf(scratch);
    for (int64_t pair = tid; pair < d.b * d.h; pair += threads) fn(pair / d.h, pair % d.h, buf.data());
  });
}

ffi::Error Forward(F32 q, F32 k, F32 v, I32 seg, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse, int64_t threads) {
  if (std::string why = Invalid(q, k, v, seg, threads); !why.empty())
    return ffi::Error::InvalidArgument("CausalAttentionForward: " + why);
  const Dims d = DimsOf(q);
  const float scale = 1.f / std::sqrt(static_cast<float>(d.dh));
  ForPairs(d, static_cast<int>(threads), d.s * d.s, [&](int64_t e, int64_t head, float* p) {
    const int64_t at = d.offset(e, head), ld = d.row();
    Gemm(kN, kT, d.s, d.s, d.dh, q.typed_data() + at, ld, k.typed_data() + at, ld, 0.f, p, d.s, scale);
    Probabilities(p, seg.typed_data() + e * d.s, d.s, nullptr, lse->typed_data() + (e * d.h + head) * d.s);
    Gemm(kN, kN, d.s, d.dh, d.s, p, d.s, v.typed_data() + at, ld, 0.f, out->typed_data() + at, ld);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(F32 q, F32 k, F32 v, I32 seg, F32 out, F32 lse, F32 d_out,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv, int64_t threads) {
  if (std::string why = Invalid(q, k, v, seg, threads, {&out, &d_out}); !why.empty())
    return ffi::Error::InvalidArgument("CausalAttentionBackward: " + why);
  const Dims d = DimsOf(q);
  if (lse.element_count() != static_cast<size_t>(d.b * d.h * d.s))
    return ffi::Error::InvalidArgument("CausalAttentionBackward: lse must be [B, H, S]");
  const float scale = 1.f / std::sqrt(static_cast<float>(d.dh));
  ForPairs(d, static_cast<int>(threads), 2 * d.s * d.s, [&](int64_t e, int64_t head, float* buf) {
    float *p = buf, *dp = buf + d.s * d.s;
    const int64_t at = d.offset(e, head), ld = d.row(), s = d.s;
    const float *qa = q.typed_data() + at, *ka = k.typed_data() + at, *va = v.typed_data() + at;
    const float *oa = out.typed_data() + at, *doa = d_out.typed_data() + at;
    Gemm(kN, kT, s, s, d.dh, qa, ld, ka, ld, 0.f, p, s, scale);
    Probabilities(p, seg.typed_data() + e * s, s, lse.typed_data() + (e * d.h + head) * s, nullptr);
    Gemm(kN, kT, s, s, d.dh, doa, ld, va, ld, 0.f, dp, s);               // dP = dO V^T
    for (int64_t i = 0; i < s; ++i) {                                    // softmax's rows: P (dP - rowsum(dO O))
      float acc = 0.f;
      for (int64_t c = 0; c < d.dh; ++c) acc += doa[i * ld + c] * oa[i * ld + c];
      for (int64_t j = 0; j < s; ++j) dp[i * s + j] = p[i * s + j] * (dp[i * s + j] - acc);
    }
    Gemm(kN, kN, s, d.dh, s, dp, s, ka, ld, 0.f, dq->typed_data() + at, ld, scale);  // dQ = dS K
    Gemm(kT, kN, s, d.dh, s, dp, s, qa, ld, 0.f, dk->typed_data() + at, ld, scale);  // dK = dS^T Q
    Gemm(kT, kN, s, d.dh, s, p, s, doa, ld, 0.f, dv->typed_data() + at, ld);         // dV = P^T dO
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<F32>().Arg<F32>().Arg<F32>()        // q, k, v
                                  .Arg<I32>()                              // segment_ids
                                  .Ret<F32>().Ret<F32>()                   // out, lse
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CausalAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<F32>().Arg<F32>().Arg<F32>()        // q, k, v
                                  .Arg<I32>().Arg<F32>().Arg<F32>()        // segment_ids, out, lse
                                  .Arg<F32>()                              // d_out
                                  .Ret<F32>().Ret<F32>().Ret<F32>()        // dq, dk, dv
                                  .Attr<int64_t>("threads"));
