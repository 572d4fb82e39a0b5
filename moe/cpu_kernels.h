// What this project's CPU FFI kernels share (built by moe/cpu_build.py): OpenBLAS's sgemm
// (the 64-bit-index cblas that numpy ships) and a pool of worker threads.
#ifndef MOE_CPU_KERNELS_H_
#define MOE_CPU_KERNELS_H_

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

extern "C" void scipy_cblas_sgemm64_(int, int, int, int64_t, int64_t, int64_t, float, const float*,
                                     int64_t, const float*, int64_t, float, float*, int64_t);
extern "C" int openblas_set_num_threads_local(int);

namespace moe_cpu {

constexpr int kRowMajor = 101, kN = 111, kT = 112;

// "[2, 3]": a shape (any span of int64) for error messages.
template <typename Dims>
std::string Shape(const Dims& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

template <typename A, typename B>
bool SameShape(const A& a, const B& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return false;
  return true;
}

template <typename Dims>
bool HasShape(const Dims& d, std::initializer_list<int64_t> want) {
  return SameShape(d, std::vector<int64_t>(want));
}

// C[M, N] = beta * C + alpha * op(A) @ op(B), row major.
inline void Gemm(int ta, int tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc, float alpha = 1.f) {
  scipy_cblas_sgemm64_(kRowMajor, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// exp(x) within 3 ulp of std::exp for x in [-87.3, 88], branch-free so that loops of it
// vectorize (glibc's expf does not): x = n ln2 + r with |r| <= ln2 / 2, exp(r) by a degree-6
// polynomial, 2^n through the exponent bits. x is first clamped to [-87.3, 88], so the result
// is finite and never below exp(-87.3) (1.2e-38), which sums of exponentials never notice.
inline float Exp(float x) {
  x = x < -87.33654f ? -87.33654f : (x > 88.f ? 88.f : x);
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = std::fma(n, -1.428606765330187e-06f, std::fma(n, -0.693145751953125f, x));  // hi part exact
  float p = 1.f / 720.f;
  p = std::fma(p, r, 1.f / 120.f);
  p = std::fma(p, r, 1.f / 24.f);
  p = std::fma(p, r, 1.f / 6.f);
  p = std::fma(p, r, 0.5f);
  p = std::fma(p, r, 1.f);
  p = std::fma(p, r, 1.f);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float Sigmoid(float a) { return 1.f / (1.f + Exp(-a)); }

// SwiGLU rows from the saved [n, 2f] pre-activations [a | b]: h[i, j] = g[i] silu(a) b
// (g == nullptr: gates of 1).
inline void SwigluHidden(const float* ab, const float* g, int64_t n, int64_t f, float* h) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g ? g[i] : 1.f;
    for (int64_t j = 0; j < f; ++j) {
      const float a = ab[i * 2 * f + j], b = ab[i * 2 * f + f + j];
      h[i * f + j] = gi * a * Sigmoid(a) * b;
    }
  }
}

// The backward of SwigluHidden, one sigmoid per element: from ds = d(g h) [n, f], writes
// gh = g h [n, f], dab = [da | db] [n, 2f] and, where g is given, dg[i] = sum_j ds h.
inline void SwigluHiddenBackward(const float* ab, const float* g, const float* ds, int64_t n, int64_t f,
                                 float* gh, float* dab, float* dg) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g ? g[i] : 1.f;
    float acc = 0.f;
    for (int64_t j = 0; j < f; ++j) {
      const float a = ab[i * 2 * f + j], b = ab[i * 2 * f + f + j], sig = Sigmoid(a);
      const float h = a * sig * b, dsj = ds[i * f + j], dh = gi * dsj;
      gh[i * f + j] = gi * h;
      acc += dsj * h;
      dab[i * 2 * f + j] = dh * b * sig * (1.f + a * (1.f - sig));
      dab[i * 2 * f + f + j] = dh * a * sig;
    }
    if (dg) dg[i] = acc;
  }
}

// Threads one call may ask for: at least the caller, and a bound on the workers (kept for
// the process) that a bad attribute could start.
constexpr int64_t kMaxThreads = 4096;

inline std::string ThreadsInvalid(int64_t threads) {
  if (threads < 1 || threads > kMaxThreads)  // 0 would wait forever on a worker that never runs
    return "threads = " + std::to_string(threads) + " is outside [1, " + std::to_string(kMaxThreads) + "]";
  return "";
}

// Worker threads started once (on first use, grown on demand) and kept for the process:
// Run(n, fn) calls fn(0) on the caller and fn(1..n-1) on workers, and returns when all are
// done. One Run at a time. Never destroyed, so process exit does not wait on idle workers.
// Every thread's sgemm runs single-threaded: the threads are the parallelism.
class Pool {
 public:
  static Pool& Get() {
    static Pool* pool = new Pool;
    return *pool;
  }

  void Run(int n, const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> one_call(call_mu_);
    while (static_cast<int>(workers_.size()) < n - 1) {
      const int id = static_cast<int>(workers_.size()) + 1;
      workers_.emplace_back([this, id] { Work(id); });
      workers_.back().detach();
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      fn_ = &fn;
      n_ = n;
      pending_ = n - 1;
      ++generation_;
    }
    start_.notify_all();
    openblas_set_num_threads_local(1);  // the caller: XLA's thread
    fn(0);
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [this] { return pending_ == 0; });
  }

 private:
  void Work(int id) {
    openblas_set_num_threads_local(1);
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* fn;
      {
        std::unique_lock<std::mutex> lock(mu_);
        start_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (id >= n_) continue;  // not needed for this call
        fn = fn_;
      }
      (*fn)(id);
      std::lock_guard<std::mutex> lock(mu_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex call_mu_, mu_;
  std::condition_variable start_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* fn_ = nullptr;
  int n_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
};

}  // namespace moe_cpu

#endif  // MOE_CPU_KERNELS_H_
