// A dense SwiGLU FFN (the dense model's FFN, DeepSeekMoE's shared experts) on CPU, one XLA
// FFI call per pass: the tokens are split into one block of rows per thread, each running
// single-threaded sgemm on its rows; weight gradients are summed over the threads' private
// buffers at the end. Where XLA:CPU runs the same function, it writes transposed copies of
// the [T, f] activations for the weight gradients and makes separate passes for the
// activation and its derivative. f32 only. Built by moe/cpu_build.py.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_kernels.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using F32 = ffi::Buffer<ffi::F32>;

namespace {

using moe_cpu::Gemm;
using moe_cpu::Shape;
using moe_cpu::kN;
using moe_cpu::kT;

// "" when x is [T, d], w_gate and w_up [d, f], w_down [f, d] and the thread count valid.
std::string Invalid(const F32& x, const F32& wg, const F32& wu, const F32& wd, int64_t threads) {
  if (std::string why = moe_cpu::ThreadsInvalid(threads); !why.empty()) return why;
  const auto xd = x.dimensions(), g = wg.dimensions(), u = wu.dimensions(), w = wd.dimensions();
  if (xd.size() != 2 || g.size() != 2) return "x must be [T, d] and w_gate [d, f]";
  if (g[0] != xd[1]) return "w_gate " + Shape(g) + " does not match x " + Shape(xd);
  if (u.size() != 2 || u[0] != g[0] || u[1] != g[1]) return "w_up " + Shape(u) + " != w_gate " + Shape(g);
  if (w.size() != 2 || w[0] != g[1] || w[1] != g[0]) return "w_down " + Shape(w) + " must be [f, d]";
  return "";
}

// [w_gate | w_up]: [d, 2f], so that one sgemm makes both pre-activations (and one their
// input gradient): fewer, wider products run closer to the machine's peak.
std::vector<float> Packed(const F32& wg, const F32& wu, int64_t d, int64_t f) {
  std::vector<float> w(d * 2 * f);
  for (int64_t i = 0; i < d; ++i) {
    std::memcpy(w.data() + i * 2 * f, wg.typed_data() + i * f, sizeof(float) * f);
    std::memcpy(w.data() + i * 2 * f + f, wu.typed_data() + i * f, sizeof(float) * f);
  }
  return w;
}

// Rows [begin, end) of T for thread tid of n.
void Rows(int64_t t, int tid, int n, int64_t* begin, int64_t* end) {
  *begin = t * tid / n;
  *end = t * (tid + 1) / n;
}

ffi::Error Forward(F32 x, F32 wg, F32 wu, F32 wd, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> ab, int64_t threads) {
  if (std::string why = Invalid(x, wg, wu, wd, threads); !why.empty())
    return ffi::Error::InvalidArgument("DenseSwigluForward: " + why);
  const int64_t t = x.dimensions()[0], d = x.dimensions()[1], f = wg.dimensions()[1];
  const int n_threads = static_cast<int>(threads);
  const std::vector<float> w_in = Packed(wg, wu, d, f);
  moe_cpu::Pool::Get().Run(n_threads, [&](int tid) {
    int64_t r0, r1;
    Rows(t, tid, n_threads, &r0, &r1);
    const int64_t n = r1 - r0;
    if (n == 0) return;
    const float* xr = x.typed_data() + r0 * d;
    float* abr = ab->typed_data() + r0 * 2 * f;  // [n, 2f]: gate and up pre-activations, saved
    std::vector<float> h(n * f);
    Gemm(kN, kN, n, 2 * f, d, xr, d, w_in.data(), 2 * f, 0.f, abr, 2 * f);
    moe_cpu::SwigluHidden(abr, nullptr, n, f, h.data());
    Gemm(kN, kN, n, d, f, h.data(), f, wd.typed_data(), d, 0.f, out->typed_data() + r0 * d, d);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(F32 x, F32 wg, F32 wu, F32 wd, F32 ab, F32 d_out, ffi::ResultBuffer<ffi::F32> dx,
                    ffi::ResultBuffer<ffi::F32> d_wg, ffi::ResultBuffer<ffi::F32> d_wu,
                    ffi::ResultBuffer<ffi::F32> d_wd, int64_t threads) {
  if (std::string why = Invalid(x, wg, wu, wd, threads); !why.empty())
    return ffi::Error::InvalidArgument("DenseSwigluBackward: " + why);
  const int64_t t = x.dimensions()[0], d = x.dimensions()[1], f = wg.dimensions()[1];
  if (ab.element_count() != static_cast<size_t>(t * 2 * f) || d_out.element_count() != static_cast<size_t>(t * d))
    return ffi::Error::InvalidArgument("DenseSwigluBackward: saved [T, 2f] or d_out [T, d] has the wrong shape");
  const int n_threads = static_cast<int>(threads);
  const int64_t w = d * f;  // elements of each weight
  const std::vector<float> w_in = Packed(wg, wu, d, f);
  // Per thread: its rows' [d, 2f] gradient of [w_gate | w_up] and [f, d] of w_down, summed
  // over the threads at the end.
  std::vector<std::vector<float>> dw(n_threads, std::vector<float>(3 * w, 0.f));
  moe_cpu::Pool::Get().Run(n_threads, [&](int tid) {
    int64_t r0, r1;
    Rows(t, tid, n_threads, &r0, &r1);
    const int64_t n = r1 - r0;
    if (n == 0) return;
    const float *xr = x.typed_data() + r0 * d, *dy = d_out.typed_data() + r0 * d;
    const float* abr = ab.typed_data() + r0 * 2 * f;
    std::vector<float> ds(n * f), h(n * f), dab(n * 2 * f);
    Gemm(kN, kT, n, f, d, dy, d, wd.typed_data(), d, 0.f, ds.data(), f);  // d(h) = dy W_down^T
    moe_cpu::SwigluHiddenBackward(abr, nullptr, ds.data(), n, f, h.data(), dab.data(), nullptr);
    Gemm(kT, kN, f, d, n, h.data(), f, dy, d, 0.f, dw[tid].data() + 2 * w, d);     // h^T dy
    Gemm(kT, kN, d, 2 * f, n, xr, d, dab.data(), 2 * f, 0.f, dw[tid].data(), 2 * f);  // x^T [da | db]
    Gemm(kN, kT, n, d, 2 * f, dab.data(), 2 * f, w_in.data(), 2 * f, 0.f, dx->typed_data() + r0 * d, d);
  });
  float *dwg = d_wg->typed_data(), *dwu = d_wu->typed_data(), *dwd = d_wd->typed_data();
  for (int64_t i = 0; i < d; ++i)
    for (int64_t j = 0; j < f; ++j) {
      float g = 0.f, u = 0.f;
      for (int tid = 0; tid < n_threads; ++tid) g += dw[tid][i * 2 * f + j], u += dw[tid][i * 2 * f + f + j];
      dwg[i * f + j] = g, dwu[i * f + j] = u;
    }
  for (int64_t i = 0; i < w; ++i) {
    float acc = 0.f;
    for (int tid = 0; tid < n_threads; ++tid) acc += dw[tid][2 * w + i];
    dwd[i] = acc;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DenseSwigluForward, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()                              // x
                                  .Arg<F32>().Arg<F32>().Arg<F32>()        // w_gate, w_up, w_down
                                  .Ret<F32>().Ret<F32>()                   // out, ab
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DenseSwigluBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()                              // x
                                  .Arg<F32>().Arg<F32>().Arg<F32>()        // w_gate, w_up, w_down
                                  .Arg<F32>().Arg<F32>()                   // ab, d_out
                                  .Ret<F32>()                              // dx
                                  .Ret<F32>().Ret<F32>().Ret<F32>()        // d_w_gate, d_w_up, d_w_down
                                  .Attr<int64_t>("threads"));
