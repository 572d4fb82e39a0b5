// Routed SwiGLU experts on CPU as one XLA FFI call per pass, experts spread over threads.
//
// XLA:CPU splits every small per-expert matmul over all cores, and at DeepSeekMoE's expert
// sizes that scales poorly; here each thread takes whole experts (gather its tokens' rows,
// single-threaded sgemm calls, scatter-add into a thread-private output summed at the end).
// f32 only. Rows are in expert-sorted order: tok[r] is the token of row r, gate[r] its gate,
// group_sizes[e] the rows of expert e; rows past sum(group_sizes) are routed nowhere (padding):
// they add nothing to the output and their per-row outputs (saved pre-activations, d_gate) are
// exactly zero. Built by moe/cpu_build.py.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using F32 = ffi::Buffer<ffi::F32>;
using I32 = ffi::Buffer<ffi::S32>;

namespace {

using moe_cpu::Gemm;
using moe_cpu::HasShape;
using moe_cpu::Shape;
using moe_cpu::kN;
using moe_cpu::kT;
using moe_cpu::Pool;

// rows[i] = src[tok[i]], rows of width d.
void GatherRows(const float* src, const int32_t* tok, int64_t n, int64_t d, float* rows) {
  for (int64_t i = 0; i < n; ++i) std::memcpy(rows + i * d, src + int64_t{tok[i]} * d, sizeof(float) * d);
}

// dst[tok[i]] += rows[i]; within one expert a token appears once.
void ScatterAddRows(const float* rows, const int32_t* tok, int64_t n, int64_t d, float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    float* out = dst + int64_t{tok[i]} * d;
    const float* r = rows + i * d;
    for (int64_t j = 0; j < d; ++j) out[j] += r[j];
  }
}

// Runs per_expert(e, out) for every expert, expert e on thread e % threads; each
// thread adds into its own [size] buffer (thread 0 into `out`), summed into `out` at the end.
template <typename PerExpert>
void ForExperts(int64_t n_experts, int threads, float* out, int64_t size, PerExpert per_expert) {
  std::vector<std::vector<float>> private_out(threads);
  Pool::Get().Run(threads, [&](int tid) {
    float* o = out;
    if (tid > 0) {
      private_out[tid].assign(size, 0.f);
      o = private_out[tid].data();
    } else {
      std::memset(out, 0, sizeof(float) * size);
    }
    for (int64_t e = tid; e < n_experts; e += threads) per_expert(e, o);
  });
  for (int tid = 1; tid < threads; ++tid)
    for (int64_t i = 0; i < size; ++i) out[i] += private_out[tid][i];
}

// Sizes of one call: x [n_tokens, d], expert weights [n_experts, d, f] / [n_experts, f, d],
// `rows` sorted rows, expert e's rows [start[e], start[e] + sizes[e]), padding from start[n_experts].
struct Layout {
  int64_t n_tokens, d, n_experts, f, rows;
  const int32_t* sizes;
  std::vector<int64_t> start;

  Layout(const F32& x, const I32& tok, const F32& w_gate, const I32& group_sizes)
      : n_tokens(x.dimensions()[0]), d(x.dimensions()[1]), n_experts(w_gate.dimensions()[0]),
        f(w_gate.dimensions()[2]), rows(static_cast<int64_t>(tok.element_count())),
        sizes(group_sizes.typed_data()), start(n_experts + 1, 0) {
    for (int64_t e = 0; e < n_experts; ++e) start[e + 1] = start[e] + sizes[e];
  }
};

// Checks what the kernel indexes by before it touches memory: a thread count the pool can
// run, shapes that agree, group sizes >= 0 that cover at most the rows given, tokens in
// range. Returns "" when valid.
std::string Invalid(const F32& x, const I32& tok, const F32& gate, const F32& w_gate, const F32& w_up,
                    const F32& w_down, const I32& group_sizes, int64_t threads) {
  if (std::string why = moe_cpu::ThreadsInvalid(threads); !why.empty()) return why;
  const auto xd = x.dimensions(), wg = w_gate.dimensions();
  if (xd.size() != 2 || wg.size() != 3) return "x must be [T, d] and w_gate [E, d, f]";
  const int64_t n_tokens = xd[0], d = xd[1], e = wg[0], f = wg[2];
  if (wg[1] != d) return "w_gate " + Shape(wg) + " does not match x " + Shape(xd);
  if (!HasShape(w_up.dimensions(), {e, d, f})) return "w_up " + Shape(w_up.dimensions()) + " != w_gate " + Shape(wg);
  if (!HasShape(w_down.dimensions(), {e, f, d}))
    return "w_down " + Shape(w_down.dimensions()) + " must be [E, f, d] = " + Shape(std::vector<int64_t>{e, f, d});
  if (!HasShape(group_sizes.dimensions(), {e})) return "group_sizes " + Shape(group_sizes.dimensions()) + " must be [E]";
  const int64_t rows = static_cast<int64_t>(tok.element_count());
  if (tok.dimensions().size() != 1 || !HasShape(gate.dimensions(), {rows}))
    return "tok and gate must be [rows] of equal length";
  int64_t total = 0;
  for (int64_t i = 0; i < e; ++i) {
    const int32_t size = group_sizes.typed_data()[i];
    if (size < 0) return "group_sizes[" + std::to_string(i) + "] = " + std::to_string(size) + " is negative";
    total += size;
  }
  if (total > rows) return "group sizes sum to " + std::to_string(total) + " but only " + std::to_string(rows) + " rows are given";
  for (int64_t r = 0; r < total; ++r) {
    const int32_t t = tok.typed_data()[r];
    if (t < 0 || t >= n_tokens)
      return "row " + std::to_string(r) + " names token " + std::to_string(t) + ", outside [0, " + std::to_string(n_tokens) + ")";
  }
  return "";
}

ffi::Error Forward(F32 x, I32 tok, F32 gate, F32 w_gate, F32 w_up, F32 w_down, I32 group_sizes,
                   ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> ab, int64_t threads) {
  if (std::string why = Invalid(x, tok, gate, w_gate, w_up, w_down, group_sizes, threads); !why.empty())
    return ffi::Error::InvalidArgument("ExpertSwigluForward: " + why);
  const Layout l(x, tok, w_gate, group_sizes);
  const int64_t d = l.d, f = l.f, padding = l.rows - l.start[l.n_experts];
  // Outputs start uninitialised and no expert writes the padding rows.
  std::memset(ab->typed_data() + (l.rows - padding) * 2 * f, 0, sizeof(float) * padding * 2 * f);
  ForExperts(l.n_experts, static_cast<int>(threads), out->typed_data(), l.n_tokens * d, [&](int64_t e, float* o) {
    const int64_t n = l.sizes[e], s = l.start[e];
    if (n == 0) return;
    std::vector<float> xe(n * d), h(n * f), y(n * d);
    const int32_t* t = tok.typed_data() + s;
    const float* g = gate.typed_data() + s;
    GatherRows(x.typed_data(), t, n, d, xe.data());
    float* ab_e = ab->typed_data() + s * 2 * f;  // [n, 2f]: gate and up pre-activations, saved
    Gemm(kN, kN, n, f, d, xe.data(), d, w_gate.typed_data() + e * d * f, f, 0.f, ab_e, 2 * f);
    Gemm(kN, kN, n, f, d, xe.data(), d, w_up.typed_data() + e * d * f, f, 0.f, ab_e + f, 2 * f);
    moe_cpu::SwigluHidden(ab_e, g, n, f, h.data());  // gate folded in before W_down
    Gemm(kN, kN, n, d, f, h.data(), f, w_down.typed_data() + e * f * d, d, 0.f, y.data(), d);
    ScatterAddRows(y.data(), t, n, d, o);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(F32 x, I32 tok, F32 gate, F32 w_gate, F32 w_up, F32 w_down, I32 group_sizes, F32 ab,
                    F32 d_out, ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> d_gate,
                    ffi::ResultBuffer<ffi::F32> d_wg, ffi::ResultBuffer<ffi::F32> d_wu,
                    ffi::ResultBuffer<ffi::F32> d_wd, int64_t threads) {
  if (std::string why = Invalid(x, tok, gate, w_gate, w_up, w_down, group_sizes, threads); !why.empty())
    return ffi::Error::InvalidArgument("ExpertSwigluBackward: " + why);
  if (!HasShape(ab.dimensions(), {static_cast<int64_t>(tok.element_count()), 2 * w_gate.dimensions()[2]}) ||
      !HasShape(d_out.dimensions(), {x.dimensions()[0], x.dimensions()[1]}))
    return ffi::Error::InvalidArgument("ExpertSwigluBackward: saved [rows, 2f] or d_out [T, d] has the wrong shape");
  const Layout l(x, tok, w_gate, group_sizes);
  const int64_t d = l.d, f = l.f, padding = l.rows - l.start[l.n_experts];
  // The padding rows' gates reach nothing: their gradient is exactly zero.
  std::memset(d_gate->typed_data() + (l.rows - padding), 0, sizeof(float) * padding);
  ForExperts(l.n_experts, static_cast<int>(threads), dx->typed_data(), l.n_tokens * d, [&](int64_t e, float* o) {
    const int64_t n = l.sizes[e], s = l.start[e];
    float* dwg = d_wg->typed_data() + e * d * f;
    float* dwu = d_wu->typed_data() + e * d * f;
    float* dwd = d_wd->typed_data() + e * f * d;
    if (n == 0) {  // outputs are uninitialised: empty experts get exact zeros
      std::memset(dwg, 0, sizeof(float) * d * f);
      std::memset(dwu, 0, sizeof(float) * d * f);
      std::memset(dwd, 0, sizeof(float) * f * d);
      return;
    }
    std::vector<float> xe(n * d), dy(n * d), gh(n * f), dhs(n * f), dab(n * 2 * f), dxe(n * d);
    const int32_t* t = tok.typed_data() + s;
    const float* g = gate.typed_data() + s;
    const float* ab_e = ab.typed_data() + s * 2 * f;
    GatherRows(x.typed_data(), t, n, d, xe.data());
    GatherRows(d_out.typed_data(), t, n, d, dy.data());
    Gemm(kN, kT, n, f, d, dy.data(), d, w_down.typed_data() + e * f * d, d, 0.f, dhs.data(), f);  // d(g h)
    moe_cpu::SwigluHiddenBackward(ab_e, g, dhs.data(), n, f, gh.data(), dab.data(), d_gate->typed_data() + s);
    Gemm(kT, kN, f, d, n, gh.data(), f, dy.data(), d, 0.f, dwd, d);                           // (g h)^T dy
    Gemm(kT, kN, d, f, n, xe.data(), d, dab.data(), 2 * f, 0.f, dwg, f);
    Gemm(kT, kN, d, f, n, xe.data(), d, dab.data() + f, 2 * f, 0.f, dwu, f);
    Gemm(kN, kT, n, d, f, dab.data(), 2 * f, w_gate.typed_data() + e * d * f, f, 0.f, dxe.data(), d);
    Gemm(kN, kT, n, d, f, dab.data() + f, 2 * f, w_up.typed_data() + e * d * f, f, 1.f, dxe.data(), d);
    ScatterAddRows(dxe.data(), t, n, d, o);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ExpertSwigluForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<F32>().Arg<I32>().Arg<F32>()        // x, tok, gate
                                  .Arg<F32>().Arg<F32>().Arg<F32>()        // w_gate, w_up, w_down
                                  .Arg<I32>()                              // group_sizes
                                  .Ret<F32>().Ret<F32>()                   // out, ab
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(ExpertSwigluBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<F32>().Arg<I32>().Arg<F32>()
                                  .Arg<F32>().Arg<F32>().Arg<F32>()
                                  .Arg<I32>().Arg<F32>().Arg<F32>()        // group_sizes, ab, d_out
                                  .Ret<F32>().Ret<F32>()                   // dx, d_gate
                                  .Ret<F32>().Ret<F32>().Ret<F32>()        // d_w_gate, d_w_up, d_w_down
                                  .Attr<int64_t>("threads"));
