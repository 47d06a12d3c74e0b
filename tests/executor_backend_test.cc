// The executor's tensors (executor/tensor.h), shared kernel math (executor/kernels.h) and compute
// back ends (executor/backend.h). Each kernel test is one body run over every available back end:
// every back end is checked against a naive reference in double, and the CUDA back end also
// against the CPU back end's output (llm.c dev/cuda: *_cpu + validate_result). Without a device
// the CUDA half is skipped with a visible warning.
#include "executor/backend.h"
#include "executor/error.h"
#include "executor/kernels.h"
#include "executor/microbench.h"
#include "executor/tensor.h"

#include "common/error.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <unistd.h>

using namespace moesim::exec;

namespace {

// |got - ref| <= abs + |ref| * rel, per dtype.
struct Tolerance {
  double abs;
  double rel;
};
// fp32 results against a double reference: fp32's unit roundoff is 2^-24 ~ 6e-8, and the
// elementwise kernels here do a few dozen operations per value (tanhf/expf are a few ulps).
constexpr Tolerance kF32{1e-5, 1e-5};
// One rounding to bf16: half an ulp of an 8-bit significand (7 stored bits), at most 2^-8
// relative.
constexpr Tolerance kBF16{0.0, 1.0 / 256};
// A reduction over `terms` fp32 values of magnitude ~1: rounding errors of independent signs grow
// like sqrt(terms) (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., sec. 3.5),
// whatever order the back end sums in.
Tolerance f32_sum(int64_t terms) {
  return {kF32.abs * std::sqrt(static_cast<double>(std::max<int64_t>(terms, 1))), kF32.rel};
}

// Checks every value and reports the worst absolute and relative error and the first value out
// of tolerance (shown by Catch2 when the check fails).
void expect_close(const std::vector<float>& got, const std::vector<double>& ref, Tolerance tol,
                  const std::string& what) {
  REQUIRE(got.size() == ref.size());
  double max_abs = 0, max_rel = 0;
  size_t bad = 0, first_bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - ref[i]);
    if (!(err <= tol.abs + std::fabs(ref[i]) * tol.rel)) {  // NaN counts as out of tolerance
      if (bad++ == 0) first_bad = i;
    }
    if (std::isnan(err)) continue;
    max_abs = std::max(max_abs, err);
    if (ref[i] != 0) max_rel = std::max(max_rel, err / std::fabs(ref[i]));
  }
  std::string report =
      fmt::format("{}: {} values, max abs error {:.3g}, max rel error {:.3g}, tolerance {:g} + |ref|*{:g}", what,
                  got.size(), max_abs, max_rel, tol.abs, tol.rel);
  if (bad > 0)
    report += fmt::format("; {} out of tolerance, first at [{}]: got {:.9g}, expected {:.9g}", bad, first_bad,
                          got[first_bad], ref[first_bad]);
  INFO(report);
  CHECK(bad == 0);
}

std::vector<double> widen(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

// Collects one kernel's output per back end: each is checked against the reference; back ends
// after the CPU one (listed first) also against the CPU back end's output.
class CrossCheck {
 public:
  CrossCheck(std::string what, std::vector<double> reference, Tolerance tol)
      : what_(std::move(what)), reference_(std::move(reference)), tol_(tol) {}

  void check(const Backend& backend, const std::vector<float>& got) {
    expect_close(got, reference_, tol_, what_ + " on " + backend.name() + " vs reference");
    if (backend.device() == Device::kCpu) {
      cpu_ = got;
    } else {
      REQUIRE(cpu_.size() == got.size());
      expect_close(got, widen(cpu_), tol_, what_ + " on " + backend.name() + " vs the CPU back end");
    }
  }

 private:
  std::string what_;
  std::vector<double> reference_;
  Tolerance tol_;
  std::vector<float> cpu_;
};

// The CPU back end first (the reference), then CUDA when a device is present.
std::vector<std::unique_ptr<Backend>> backends_under_test() {
  std::vector<std::unique_ptr<Backend>> list;
  list.push_back(make_cpu_backend(1));
  if (cuda_available())
    list.push_back(make_cuda_backend(0));
  else
    WARN("CUDA back end skipped: no device");
  return list;
}

std::vector<float> random_values(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

Tensor on(const Backend& backend, std::vector<int64_t> shape, const std::vector<float>& values) {
  return Tensor::from(std::move(shape), values).to(backend.device());
}

std::vector<float> read(Backend& backend, const Tensor& t) {
  backend.synchronize();
  return t.to_vector();
}

}  // namespace

// ---- tensors and bf16 --------------------------------------------------------------------------

TEST_CASE("tensors: shape, zeros, alignment, views and copies") {
  Tensor z = Tensor::zeros({4, 3});
  CHECK(z.rank() == 2);
  CHECK(z.dim(1) == 3);
  CHECK(z.numel() == 12);
  CHECK(z.bytes() == 48);
  CHECK(z.describe() == "f32[4, 3] cpu");
  for (float v : z.to_vector()) CHECK(v == 0.0f);

  for (int64_t n : {1, 3, 17, 1000}) {
    Tensor t = Tensor::empty({n}, DType::kBF16);
    CHECK(reinterpret_cast<uintptr_t>(t.data()) % 64 == 0);
  }

  Tensor x = Tensor::from({2, 3}, {1, 2, 3, 4, 5, 6});
  Tensor view = x.reshaped({3, 2});
  CHECK(view.describe() == "f32[3, 2] cpu");
  view.f32()[5] = 60;
  CHECK(x.f32()[5] == 60);  // same buffer
  Tensor copy = x.clone();
  copy.f32()[0] = 10;
  CHECK(x.f32()[0] == 1);  // deep copy

  Tensor empty = Tensor::zeros({0, 5});
  CHECK(empty.numel() == 0);
  CHECK(empty.to_vector().empty());
  CHECK(empty.to(DType::kBF16).bytes() == 0);

  CHECK_THROWS_AS(Tensor::from({2, 2}, {1, 2, 3}), moesim::InternalError);
  CHECK_THROWS_AS(x.reshaped({4, 2}), moesim::InternalError);
  CHECK_THROWS_AS(x.to(DType::kBF16).f32(), moesim::InternalError);
  CHECK_THROWS_AS(Tensor::zeros({-1, 2}), moesim::InternalError);
}

namespace {

// Resident memory of this process (Linux /proc/self/statm), bytes.
double resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  double pages = 0, resident = 0;
  statm >> pages >> resident;
  return resident * static_cast<double>(::sysconf(_SC_PAGESIZE));
}

}  // namespace

TEST_CASE("freed CPU tensors wait for reuse until the cached blocks are released") {
  constexpr int64_t kElements = 64 << 20;  // 256 MB
  double held = 0;
  {
    const Tensor big = Tensor::zeros({kElements}, DType::kF32, Device::kCpu);
    held = resident_bytes();
  }
  // Freed: kept for the next tensor of its size, still resident.
  CHECK(resident_bytes() > held - 64e6);
  release_cached_cpu_blocks();
  CHECK(resident_bytes() < held - 192e6);
}

TEST_CASE("CUDA requests without a device or without CUDA throw exec::Error") {
  if (cuda_available()) {
    CHECK_THROWS_AS(make_cuda_backend(1 << 20), Error);  // no such device
    return;
  }
  CHECK_THROWS_AS(Tensor::zeros({2}, DType::kF32, Device::kCuda), Error);
  CHECK_THROWS_AS(Tensor::from({2}, {1, 2}).to(Device::kCuda), Error);
  CHECK_THROWS_AS(make_cuda_backend(0), Error);
#ifndef MOESIM_HAVE_CUDA
  CHECK_THROWS_WITH(make_cuda_backend(0), Catch::Contains("built without CUDA"));
#endif
}

TEST_CASE("bf16 conversion rounds to nearest even and round-trips") {
  using kernels::bf16_to_f32;
  using kernels::f32_to_bf16;
  const auto from_bits = [](uint32_t u) { return kernels::bits_float(u); };
  CHECK(f32_to_bf16(1.0f) == 0x3f80);
  CHECK(f32_to_bf16(-2.0f) == 0xc000);
  CHECK(f32_to_bf16(from_bits(0x3f808000u)) == 0x3f80);  // tie, kept bit even: down
  CHECK(f32_to_bf16(from_bits(0x3f818000u)) == 0x3f82);  // tie, kept bit odd: up to even
  CHECK(f32_to_bf16(from_bits(0x3f808001u)) == 0x3f81);  // just above the tie: up
  CHECK(f32_to_bf16(from_bits(0x3f807fffu)) == 0x3f80);  // just below the tie: down
  CHECK(f32_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);  // rounds up to +inf
  CHECK(f32_to_bf16(std::numeric_limits<float>::infinity()) == 0x7f80);
  CHECK(f32_to_bf16(-0.0f) == 0x8000);
  CHECK(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  CHECK(std::isnan(bf16_to_f32(f32_to_bf16(from_bits(0x7f800001u)))));  // a NaN whose payload is all low bits

  // Every bf16 value is an fp32 value and converts back to itself.
  int mismatches = 0;
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const float f = bf16_to_f32(static_cast<uint16_t>(h));
    if (std::isnan(f) ? !std::isnan(bf16_to_f32(f32_to_bf16(f))) : f32_to_bf16(f) != h) ++mismatches;
  }
  CHECK(mismatches == 0);

  // Random values: the result is the nearer of the two neighbouring bf16 values.
  std::vector<float> values = random_values(4096, 7, -1000.0f, 1000.0f);
  mismatches = 0;
  for (float v : values) {
    const uint32_t u = kernels::float_bits(v);
    const double below = bf16_to_f32(static_cast<uint16_t>(u >> 16));
    const double above = bf16_to_f32(static_cast<uint16_t>((u >> 16) + 1));
    const double got = bf16_to_f32(f32_to_bf16(v));
    const double best = std::fabs(v - below) <= std::fabs(above - v) ? below : above;
    if (got != best && std::fabs(v - below) != std::fabs(above - v)) ++mismatches;
  }
  CHECK(mismatches == 0);

  // Tensor conversions on every back end's device give the same bits as the kernel on the host.
  for (const auto& backend : backends_under_test()) {
    Tensor x = on(*backend, {64, 64}, values);
    Tensor half = x.to(DType::kBF16);
    CHECK(half.dtype() == DType::kBF16);
    CHECK(half.bytes() == 2 * 4096);
    const std::vector<float> round_trip = half.to(DType::kF32).to_vector();
    expect_close(round_trip, widen(values), kBF16, "bf16 round trip on " + backend->name());
    std::vector<double> host_rounded;
    for (float v : values) host_rounded.push_back(bf16_to_f32(f32_to_bf16(v)));
    expect_close(half.to_vector(), host_rounded, {0, 0}, "bf16 bits on " + backend->name());
  }
}

// ---- GEMM ---------------------------------------------------------------------------------

namespace {

// C = alpha op(A) op(B) + beta C in double, by the definition.
std::vector<double> reference_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                                   const std::vector<float>& a, const std::vector<float>& b, double beta,
                                   const std::vector<float>& c) {
  std::vector<double> out(static_cast<size_t>(m * n));
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p) {
        const double aip = trans_a ? a[static_cast<size_t>(p * m + i)] : a[static_cast<size_t>(i * k + p)];
        const double bpj = trans_b ? b[static_cast<size_t>(j * k + p)] : b[static_cast<size_t>(p * n + j)];
        s += aip * bpj;
      }
      out[static_cast<size_t>(i * n + j)] = alpha * s + beta * c[static_cast<size_t>(i * n + j)];
    }
  return out;
}

struct GemmSize {
  int64_t m, n, k;
};
constexpr GemmSize kGemmSizes[] = {{37, 29, 43}, {1, 7, 5}, {64, 1, 3}, {5, 6, 0}, {130, 70, 257}};

}  // namespace

TEST_CASE("gemm matches a naive reference for every transpose combination and odd sizes") {
  const auto backends = backends_under_test();
  uint32_t seed = 1;
  for (const GemmSize& s : kGemmSizes)
    for (bool trans_a : {false, true})
      for (bool trans_b : {false, true}) {
        const std::vector<float> a = random_values(static_cast<size_t>(s.m * s.k), seed++);
        const std::vector<float> b = random_values(static_cast<size_t>(s.k * s.n), seed++);
        const std::vector<float> c = random_values(static_cast<size_t>(s.m * s.n), seed++);
        const float alpha = 0.75f, beta = -0.5f;
        CrossCheck check(fmt::format("gemm m={} n={} k={} trans_a={} trans_b={}", s.m, s.n, s.k, trans_a, trans_b),
                         reference_gemm(trans_a, trans_b, s.m, s.n, s.k, alpha, a, b, beta, c), f32_sum(s.k));
        for (const auto& backend : backends) {
          const Tensor ta = on(*backend, {static_cast<int64_t>(a.size())}, a);
          const Tensor tb = on(*backend, {static_cast<int64_t>(b.size())}, b);
          Tensor tc = on(*backend, {s.m, s.n}, c);
          backend->gemm(trans_a, trans_b, s.m, s.n, s.k, alpha, ta.device_f32(), tb.device_f32(), beta,
                        tc.device_f32());
          check.check(*backend, read(*backend, tc));
        }
      }
}

TEST_CASE("gemm on row views by pointer offset leaves the rest of C untouched") {
  // Two "experts" over one token buffer: rows [0, 3) use W0, rows [3, 8) use W1.
  const int64_t tokens = 8, k = 6, n = 5, split = 3;
  const std::vector<float> x = random_values(static_cast<size_t>(tokens * k), 11);
  const std::vector<float> w = random_values(static_cast<size_t>(2 * k * n), 12);
  std::vector<double> ref(static_cast<size_t>(tokens * n));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t j = 0; j < n; ++j) {
      const int64_t e = t < split ? 0 : 1;
      double s = 0;
      for (int64_t p = 0; p < k; ++p)
        s += double{x[static_cast<size_t>(t * k + p)]} * w[static_cast<size_t>(e * k * n + p * n + j)];
      ref[static_cast<size_t>(t * n + j)] = s;
    }
  CrossCheck check("grouped gemm by views", ref, f32_sum(k));
  for (const auto& backend : backends_under_test()) {
    const Tensor tx = on(*backend, {tokens, k}, x);
    const Tensor tw = on(*backend, {2, k, n}, w);
    Tensor ty = Tensor::zeros({tokens, n}, DType::kF32, backend->device());
    backend->gemm(false, false, split, n, k, 1.0f, tx.device_f32(), tw.device_f32(), 0.0f, ty.device_f32());
    backend->gemm(false, false, tokens - split, n, k, 1.0f, tx.device_f32() + split * k, tw.device_f32() + k * n,
                  0.0f, ty.device_f32() + split * n);
    check.check(*backend, read(*backend, ty));
  }
}

TEST_CASE("batched gemm is the gemm of each batch on its strided views, for every transpose combination") {
  // Three products of odd sizes a batch apart by more than each takes (the gaps left alone), as
  // attention's per (sequence, head) products; one cuBLAS call on a GPU.
  const int64_t m = 7, n = 5, k = 9, batch = 3, stride_a = m * k + 2, stride_b = k * n + 3, stride_c = m * n + 4;
  const std::vector<float> a = random_values(static_cast<size_t>(batch * stride_a), 31, -1.0f, 1.0f);
  const std::vector<float> b = random_values(static_cast<size_t>(batch * stride_b), 32, -1.0f, 1.0f);
  const std::vector<float> c0 = random_values(static_cast<size_t>(batch * stride_c), 33, -1.0f, 1.0f);
  for (bool trans_a : {false, true})
    for (bool trans_b : {false, true}) {
      std::vector<double> ref(c0.begin(), c0.end());
      for (int64_t i = 0; i < batch; ++i) {
        auto part = [](const std::vector<float>& v, int64_t from, int64_t count) {
          return std::vector<float>(v.begin() + from, v.begin() + from + count);
        };
        const std::vector<double> one =
            reference_gemm(trans_a, trans_b, m, n, k, 0.5, part(a, i * stride_a, m * k), part(b, i * stride_b, k * n),
                           0.25, part(c0, i * stride_c, m * n));
        std::copy(one.begin(), one.end(), ref.begin() + i * stride_c);
      }
      CrossCheck check(fmt::format("gemm_batched trans_a {} trans_b {}", trans_a, trans_b), ref, f32_sum(k));
      for (const auto& backend : backends_under_test()) {
        const Tensor ta = on(*backend, {batch * stride_a}, a), tb = on(*backend, {batch * stride_b}, b);
        Tensor tc = on(*backend, {batch * stride_c}, c0);
        backend->gemm_batched(trans_a, trans_b, m, n, k, 0.5f, ta.device_f32(), stride_a, tb.device_f32(), stride_b,
                              0.25f, tc.device_f32(), stride_c, batch);
        check.check(*backend, read(*backend, tc));
      }
    }
}

TEST_CASE("bf16 gemm accumulates bf16 inputs in fp32") {
  const auto backends = backends_under_test();
  uint32_t seed = 100;
  for (const GemmSize& s : kGemmSizes)
    for (bool trans_a : {false, true})
      for (bool trans_b : {false, true}) {
        // Inputs already on the bf16 grid: the reference sees exactly what the kernels see.
        const Tensor a16 =
            Tensor::from({s.m * s.k}, random_values(static_cast<size_t>(s.m * s.k), seed++)).to(DType::kBF16);
        const Tensor b16 =
            Tensor::from({s.k * s.n}, random_values(static_cast<size_t>(s.k * s.n), seed++)).to(DType::kBF16);
        const std::vector<float> c = random_values(static_cast<size_t>(s.m * s.n), seed++);
        const float alpha = 1.5f, beta = 0.25f;
        CrossCheck check(
            fmt::format("bf16 gemm m={} n={} k={} trans_a={} trans_b={}", s.m, s.n, s.k, trans_a, trans_b),
            reference_gemm(trans_a, trans_b, s.m, s.n, s.k, alpha, a16.to_vector(), b16.to_vector(), beta, c),
            f32_sum(s.k));
        for (const auto& backend : backends) {
          const Tensor ta = a16.to(backend->device());
          const Tensor tb = b16.to(backend->device());
          Tensor tc = on(*backend, {s.m, s.n}, c);
          backend->gemm_bf16(trans_a, trans_b, s.m, s.n, s.k, alpha, static_cast<const uint16_t*>(ta.data()),
                             static_cast<const uint16_t*>(tb.data()), beta, tc.device_f32());
          check.check(*backend, read(*backend, tc));
        }
      }
}

// ---- elementwise ---------------------------------------------------------------------------

namespace {

double reference_gelu(double x) {
  const double pi = 3.14159265358979323846;
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / pi) * (x + 0.044715 * x * x * x)));
}

}  // namespace

TEST_CASE("GELU's tanh through one expf stays within float round-off of tanh and saturates exactly") {
  double worst = 0;
  for (int i = -4000; i <= 4000; ++i) {
    const float u = static_cast<float>(i) * 0.005f;  // [-20, 20]
    worst = std::max(worst, std::abs(static_cast<double>(kernels::tanh_by_exp(u)) - std::tanh(static_cast<double>(u))));
  }
  CHECK(worst < 5e-7);  // a few ulps of 1: what 1 + tanh(u) and 1 - tanh(u)^2 need
  CHECK(kernels::tanh_by_exp(100.0f) == 1.0f);
  CHECK(kernels::tanh_by_exp(-100.0f) == -1.0f);
  CHECK(kernels::tanh_by_exp(std::numeric_limits<float>::infinity()) == 1.0f);
  CHECK(kernels::tanh_by_exp(-std::numeric_limits<float>::infinity()) == -1.0f);
  CHECK(std::isnan(kernels::tanh_by_exp(std::numeric_limits<float>::quiet_NaN())));
}

TEST_CASE("gelu matches its formula and gelu_backward a central finite difference") {
  std::vector<float> x = random_values(1000, 21, -6.0f, 6.0f);
  for (float v : {0.0f, 1e-3f, -1e-3f, 10.0f, -10.0f, 30.0f, -30.0f}) x.push_back(v);
  const std::vector<float> dy = random_values(x.size(), 22);
  std::vector<double> ref_y, ref_dx;
  const double h = 1e-5;
  for (size_t i = 0; i < x.size(); ++i) {
    ref_y.push_back(reference_gelu(x[i]));
    ref_dx.push_back(dy[i] * (reference_gelu(x[i] + h) - reference_gelu(x[i] - h)) / (2 * h));
  }
  const int64_t n = static_cast<int64_t>(x.size());
  CrossCheck check_y("gelu", ref_y, kF32), check_dx("gelu_backward", ref_dx, kF32);
  for (const auto& backend : backends_under_test()) {
    const Tensor tx = on(*backend, {n}, x), tdy = on(*backend, {n}, dy);
    Tensor ty = Tensor::empty({n}, DType::kF32, backend->device());
    Tensor tdx = Tensor::empty({n}, DType::kF32, backend->device());
    backend->gelu(tx.device_f32(), ty.device_f32(), n);
    backend->gelu_backward(tx.device_f32(), tdy.device_f32(), tdx.device_f32(), n);
    check_y.check(*backend, read(*backend, ty));
    check_dx.check(*backend, read(*backend, tdx));
  }
}

TEST_CASE("add, axpy and copy are exact on small integers") {
  const int64_t n = 1001;
  std::vector<float> a(n), b(n);
  std::vector<double> sum(n), axpy(n);
  for (int64_t i = 0; i < n; ++i) {
    a[static_cast<size_t>(i)] = static_cast<float>(i % 97 - 48);
    b[static_cast<size_t>(i)] = static_cast<float>(i % 31 - 15);
    sum[static_cast<size_t>(i)] = a[static_cast<size_t>(i)] + b[static_cast<size_t>(i)];
    axpy[static_cast<size_t>(i)] = b[static_cast<size_t>(i)] + 0.5 * a[static_cast<size_t>(i)];
  }
  const Tolerance exact{0, 0};
  CrossCheck check_add("add", sum, exact), check_axpy("axpy", axpy, exact), check_copy("copy", widen(a), exact);
  for (const auto& backend : backends_under_test()) {
    const Tensor ta = on(*backend, {n}, a), tb = on(*backend, {n}, b);
    Tensor ty = Tensor::empty({n}, DType::kF32, backend->device());
    backend->add(ta.device_f32(), tb.device_f32(), ty.device_f32(), n);
    check_add.check(*backend, read(*backend, ty));
    Tensor tz = tb.clone();
    backend->axpy(0.5f, ta.device_f32(), tz.device_f32(), n);
    check_axpy.check(*backend, read(*backend, tz));
    Tensor tc = Tensor::zeros({n}, DType::kF32, backend->device());
    backend->copy(ta.data(), tc.data(), ta.bytes());
    check_copy.check(*backend, read(*backend, tc));
  }
}

// ---- softmax --------------------------------------------------------------------------------

TEST_CASE("softmax rows sum to one, match a reference and stay finite for large inputs") {
  struct Shape {
    int64_t rows, cols;
  };
  const auto backends = backends_under_test();
  uint32_t seed = 30;
  for (const Shape s : {Shape{7, 33}, Shape{3, 1000}, Shape{2, 1}}) {
    std::vector<float> x = random_values(static_cast<size_t>(s.rows * s.cols), seed++, -5.0f, 5.0f);
    // Rows that overflow (or underflow to 0/0) in exp() without the max subtraction, and a one-hot row.
    if (s.rows > 2)
      for (int64_t j = 0; j < s.cols; ++j) {
        x[static_cast<size_t>(0 * s.cols + j)] += 1e4f;
        x[static_cast<size_t>(1 * s.cols + j)] -= 1e4f;
        x[static_cast<size_t>(2 * s.cols + j)] = j == 0 ? 200.0f : -200.0f;
      }
    std::vector<double> ref(x.size());
    for (int64_t r = 0; r < s.rows; ++r) {
      const float* xr = &x[static_cast<size_t>(r * s.cols)];
      double m = -INFINITY, sum = 0;
      for (int64_t j = 0; j < s.cols; ++j) m = std::max(m, double{xr[j]});
      for (int64_t j = 0; j < s.cols; ++j) sum += std::exp(xr[j] - m);
      for (int64_t j = 0; j < s.cols; ++j) ref[static_cast<size_t>(r * s.cols + j)] = std::exp(xr[j] - m) / sum;
    }
    std::vector<double> ones(static_cast<size_t>(s.rows), 1.0);
    const std::string what = fmt::format("softmax {}x{}", s.rows, s.cols);
    CrossCheck check(what, ref, kF32), check_sums(what + " row sums", ones, f32_sum(s.cols));
    for (const auto& backend : backends) {
      const Tensor tx = on(*backend, {s.rows, s.cols}, x);
      Tensor ty = Tensor::empty({s.rows, s.cols}, DType::kF32, backend->device());
      backend->softmax_rows(tx.device_f32(), ty.device_f32(), s.rows, s.cols);
      const std::vector<float> y = read(*backend, ty);
      check.check(*backend, y);
      std::vector<float> sums(static_cast<size_t>(s.rows), 0.0f);
      for (int64_t r = 0; r < s.rows; ++r)
        for (int64_t j = 0; j < s.cols; ++j) sums[static_cast<size_t>(r)] += y[static_cast<size_t>(r * s.cols + j)];
      check_sums.check(*backend, sums);
    }
  }
}

// ---- layernorm ------------------------------------------------------------------------------

namespace {

struct LayerNormInputs {
  int64_t rows, cols;
  std::vector<float> x, gamma, beta, dy;
};

// sum_{r,j} dy[r,j] * y[r,j] in double: the loss whose gradients layernorm_backward returns.
// Rows in [row_begin, row_end) only (the others do not change when one x perturbs).
double weighted_output(const LayerNormInputs& in, const std::vector<double>& x, const std::vector<double>& gamma,
                       const std::vector<double>& beta, int64_t row_begin, int64_t row_end, double eps) {
  double loss = 0;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const double* xr = &x[static_cast<size_t>(r * in.cols)];
    double mean = 0, var = 0;
    for (int64_t j = 0; j < in.cols; ++j) mean += xr[j];
    mean /= static_cast<double>(in.cols);
    for (int64_t j = 0; j < in.cols; ++j) var += (xr[j] - mean) * (xr[j] - mean);
    const double rstd = 1 / std::sqrt(var / static_cast<double>(in.cols) + eps);
    for (int64_t j = 0; j < in.cols; ++j)
      loss += in.dy[static_cast<size_t>(r * in.cols + j)] * ((xr[j] - mean) * rstd * gamma[static_cast<size_t>(j)] +
                                                            beta[static_cast<size_t>(j)]);
  }
  return loss;
}

}  // namespace

TEST_CASE("layernorm matches a double reference and its backward central finite differences") {
  const float eps = 1e-5f;
  const auto backends = backends_under_test();
  uint32_t seed = 50;
  // cols = 300 > 256 threads: the CUDA row kernels stride; cols = 1: zero variance, dx = 0.
  for (const auto& [rows, cols, offset] :
       {std::tuple<int64_t, int64_t, float>{5, 67, 0.0f}, {3, 300, 10.0f}, {2, 1, 0.0f}}) {
    const size_t n = static_cast<size_t>(rows * cols);
    LayerNormInputs in{rows, cols, random_values(n, seed++, -2.0f, 2.0f),
                       random_values(static_cast<size_t>(cols), seed++, 0.5f, 1.5f),
                       random_values(static_cast<size_t>(cols), seed++), random_values(n, seed++)};
    for (float& v : in.x) v += offset;  // a row mean far from 0: the two-pass variance must not cancel

    // Forward reference in double.
    std::vector<double> ref_y(in.x.size()), ref_mean(static_cast<size_t>(rows)), ref_rstd(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r) {
      double mean = 0, var = 0;
      for (int64_t j = 0; j < cols; ++j) mean += in.x[static_cast<size_t>(r * cols + j)];
      mean /= static_cast<double>(cols);
      for (int64_t j = 0; j < cols; ++j) var += std::pow(in.x[static_cast<size_t>(r * cols + j)] - mean, 2);
      const double rstd = 1 / std::sqrt(var / static_cast<double>(cols) + eps);
      ref_mean[static_cast<size_t>(r)] = mean;
      ref_rstd[static_cast<size_t>(r)] = rstd;
      for (int64_t j = 0; j < cols; ++j) {
        const size_t i = static_cast<size_t>(r * cols + j);
        ref_y[i] = (in.x[i] - mean) * rstd * in.gamma[static_cast<size_t>(j)] + in.beta[static_cast<size_t>(j)];
      }
    }

    // Backward reference: central differences of the weighted output, in double.
    const double h = 1e-4;
    std::vector<double> x = widen(in.x), gamma = widen(in.gamma), beta = widen(in.beta);
    std::vector<double> fd_dx(x.size()), fd_dgamma(gamma.size()), fd_dbeta(beta.size());
    const double prior = 0.25;  // dgamma and dbeta start here: they accumulate
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) {
        double& v = x[static_cast<size_t>(r * cols + j)];
        const double saved = v;
        v = saved + h;
        const double up = weighted_output(in, x, gamma, beta, r, r + 1, eps);
        v = saved - h;
        const double down = weighted_output(in, x, gamma, beta, r, r + 1, eps);
        v = saved;
        fd_dx[static_cast<size_t>(r * cols + j)] = (up - down) / (2 * h);
      }
    for (auto [param, grad] : {std::pair{&gamma, &fd_dgamma}, std::pair{&beta, &fd_dbeta}})
      for (size_t j = 0; j < param->size(); ++j) {
        const double saved = (*param)[j];
        (*param)[j] = saved + h;
        const double up = weighted_output(in, x, gamma, beta, 0, rows, eps);
        (*param)[j] = saved - h;
        const double down = weighted_output(in, x, gamma, beta, 0, rows, eps);
        (*param)[j] = saved;
        (*grad)[j] = prior + (up - down) / (2 * h);
      }

    const std::string what = fmt::format("layernorm {}x{} offset {}", rows, cols, offset);
    const Tolerance row_tol = f32_sum(cols);
    CrossCheck check_y(what + " y", ref_y, row_tol), check_mean(what + " mean", ref_mean, row_tol),
        check_rstd(what + " rstd", ref_rstd, row_tol), check_dx(what + " dx", fd_dx, row_tol),
        check_dgamma(what + " dgamma", fd_dgamma, f32_sum(rows * cols)),
        check_dbeta(what + " dbeta", fd_dbeta, f32_sum(rows));
    for (const auto& backend : backends) {
      const Device dev = backend->device();
      const Tensor tx = on(*backend, {rows, cols}, in.x), tgamma = on(*backend, {cols}, in.gamma),
                   tbeta = on(*backend, {cols}, in.beta), tdy = on(*backend, {rows, cols}, in.dy);
      Tensor ty = Tensor::empty({rows, cols}, DType::kF32, dev), tmean = Tensor::empty({rows}, DType::kF32, dev),
             trstd = Tensor::empty({rows}, DType::kF32, dev);
      backend->layernorm(tx.device_f32(), tgamma.device_f32(), tbeta.device_f32(), ty.device_f32(), tmean.device_f32(),
                         trstd.device_f32(), rows, cols, eps);
      check_y.check(*backend, read(*backend, ty));
      check_mean.check(*backend, read(*backend, tmean));
      check_rstd.check(*backend, read(*backend, trstd));

      // Without saved statistics (inference) y is the same.
      Tensor ty2 = Tensor::empty({rows, cols}, DType::kF32, dev);
      backend->layernorm(tx.device_f32(), tgamma.device_f32(), tbeta.device_f32(), ty2.device_f32(), nullptr, nullptr,
                         rows, cols, eps);
      CHECK(read(*backend, ty2) == read(*backend, ty));

      Tensor tdx = on(*backend, {rows, cols}, std::vector<float>(in.x.size(), 7.0f));  // overwritten
      Tensor tdgamma = on(*backend, {cols}, std::vector<float>(static_cast<size_t>(cols), static_cast<float>(prior)));
      Tensor tdbeta = tdgamma.clone();
      backend->layernorm_backward(tx.device_f32(), tgamma.device_f32(), tmean.device_f32(), trstd.device_f32(),
                                  tdy.device_f32(), tdx.device_f32(), tdgamma.device_f32(), tdbeta.device_f32(), rows,
                                  cols);
      check_dx.check(*backend, read(*backend, tdx));
      check_dgamma.check(*backend, read(*backend, tdgamma));
      check_dbeta.check(*backend, read(*backend, tdbeta));
    }
  }
}

TEST_CASE("back ends name themselves") {
  for (const auto& backend : backends_under_test()) {
    CHECK(!backend->name().empty());
    if (backend->device() == Device::kCpu) CHECK(backend->name().rfind("cpu (OpenBLAS, ", 0) == 0);
    if (backend->device() == Device::kCuda) CHECK(backend->name().rfind("cuda:0 (", 0) == 0);
  }
}

// ---- the layers' data movement: bias, sums, gathers, scatters, heads, mask --------------------

namespace {

Tensor on_i32(const Backend& backend, const std::vector<int32_t>& values) {
  return Tensor::from_i32({static_cast<int64_t>(values.size())}, values.data(), values.size(), backend.device());
}

std::vector<float> small_integers(size_t n, int modulus, int offset) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<float>(static_cast<int>((i * 7919) % modulus) - offset);
  return v;
}

}  // namespace

TEST_CASE("bias add, row repeat, column sums and scale are exact on small integers") {
  const int64_t rows = 37, cols = 300;  // cols > 256 threads: the CUDA kernels stride
  const std::vector<float> y0 = small_integers(static_cast<size_t>(rows * cols), 41, 20);
  const std::vector<float> bias = small_integers(static_cast<size_t>(cols), 13, 6);
  const std::vector<float> sums0 = small_integers(static_cast<size_t>(cols), 5, 2);
  std::vector<double> ref_bias(y0.size()), ref_repeat(y0.size()), ref_sums(sums0.begin(), sums0.end()),
      ref_scale(y0.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) {
      const size_t i = static_cast<size_t>(r * cols + c);
      ref_bias[i] = y0[i] + bias[static_cast<size_t>(c)];
      ref_repeat[i] = bias[static_cast<size_t>(c)];
      ref_sums[static_cast<size_t>(c)] += y0[i];
      ref_scale[i] = 0.25 * y0[i];
    }
  const Tolerance exact{0, 0};
  CrossCheck check_bias("add_bias", ref_bias, exact), check_repeat("repeat_row", ref_repeat, exact),
      check_sums("column_sums_add", ref_sums, exact), check_scale("scale", ref_scale, exact);
  for (const auto& backend : backends_under_test()) {
    const Tensor tb = on(*backend, {cols}, bias);
    Tensor ty = on(*backend, {rows, cols}, y0);
    backend->add_bias(ty.device_f32(), tb.device_f32(), rows, cols);
    check_bias.check(*backend, read(*backend, ty));
    Tensor tr = on(*backend, {rows, cols}, y0);
    backend->repeat_row(tb.device_f32(), tr.device_f32(), rows, cols);
    check_repeat.check(*backend, read(*backend, tr));
    const Tensor tx = on(*backend, {rows, cols}, y0);
    Tensor ts = on(*backend, {cols}, sums0);
    backend->column_sums_add(tx.device_f32(), ts.device_f32(), rows, cols);
    check_sums.check(*backend, read(*backend, ts));
    Tensor tsc = on(*backend, {rows, cols}, y0);
    backend->scale(0.25f, tsc.device_f32(), rows * cols);
    check_scale.check(*backend, read(*backend, tsc));
  }
}

TEST_CASE("grouped row repeats and column sums match the per-group ones, over several launches") {
  // More groups than one GPU launch takes, empty ones among them, rows before the first group and
  // after the last that no group owns (left as they were).
  const int groups = kRowGroupsPerLaunch + 3;
  const int64_t cols = 300;
  std::vector<int64_t> begin = {2};
  for (int g = 0; g < groups; ++g) begin.push_back(begin.back() + (g % 5 == 3 ? 0 : g % 4 + 1));
  const int64_t rows = begin.back() + 3;
  const std::vector<float> y0 = small_integers(static_cast<size_t>(rows * cols), 41, 20);
  const std::vector<float> row = small_integers(static_cast<size_t>(groups * cols), 13, 6);
  const std::vector<float> sums0 = small_integers(static_cast<size_t>(groups * cols), 5, 2);
  std::vector<double> ref_repeat(y0.begin(), y0.end()), ref_sums(sums0.begin(), sums0.end());
  for (int g = 0; g < groups; ++g)
    for (int64_t r = begin[static_cast<size_t>(g)]; r < begin[static_cast<size_t>(g) + 1]; ++r)
      for (int64_t c = 0; c < cols; ++c) {
        const size_t i = static_cast<size_t>(r * cols + c), j = static_cast<size_t>(g * cols + c);
        ref_repeat[i] = row[j];
        ref_sums[j] += y0[i];
      }
  const Tolerance exact{0, 0};
  CrossCheck check_repeat("repeat_row_grouped", ref_repeat, exact),
      check_sums("column_sums_add_grouped", ref_sums, exact);
  for (const auto& backend : backends_under_test()) {
    const Tensor trow = on(*backend, {groups, cols}, row);
    Tensor ty = on(*backend, {rows, cols}, y0);
    backend->repeat_row_grouped(trow.device_f32(), ty.device_f32(), begin.data(), groups, cols);
    check_repeat.check(*backend, read(*backend, ty));
    const Tensor tx = on(*backend, {rows, cols}, y0);
    Tensor ts = on(*backend, {groups, cols}, sums0);
    backend->column_sums_add_grouped(tx.device_f32(), ts.device_f32(), begin.data(), groups, cols);
    check_sums.check(*backend, read(*backend, ts));
  }
}

TEST_CASE("gathers, scatter-adds and the MoE combine move rows exactly") {
  // 13 columns: the CPU combine backward's dot runs one pass of its 8 lanes and a tail of 5.
  const int64_t src_rows = 6, cols = 13;
  const std::vector<float> src = small_integers(static_cast<size_t>(src_rows * cols), 17, 8);
  // Gather with repeats; scatter-add with a repeated index (rows collect in order).
  const std::vector<int32_t> index = {3, 0, 3, 5, 1};
  const int64_t n = static_cast<int64_t>(index.size());
  // The scatter's plan: rows by destination 0, 1, 3, 5 (destination 3's two in order), then the
  // destinations, then where each group begins.
  const ScatterPlan plan = scatter_add_plan(index.data(), index.size());
  CHECK(plan.rows == n);
  CHECK(plan.groups == 4);
  CHECK(plan.packed == std::vector<int32_t>{1, 4, 0, 2, 3, /**/ 0, 1, 3, 5, /**/ 0, 1, 2, 4, 5});
  CHECK(scatter_add_plan(nullptr, 0).packed == std::vector<int32_t>{0});
  const std::vector<int32_t> far = {1000, 2, 1000, 7};  // destinations far apart: sorted, not counted
  CHECK(scatter_add_plan(far.data(), far.size()).packed ==
        std::vector<int32_t>{1, 3, 0, 2, /**/ 2, 7, 1000, /**/ 0, 1, 2, 4});
  std::vector<double> ref_gather, ref_scatter(static_cast<size_t>(src_rows * cols), 1.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < cols; ++c) {
      ref_gather.push_back(src[static_cast<size_t>(index[static_cast<size_t>(i)] * cols + c)]);
      ref_scatter[static_cast<size_t>(index[static_cast<size_t>(i)] * cols + c)] += src[static_cast<size_t>(i * cols + c)];
    }
  // Combine: 3 tokens, k = 2, one dropped assignment; weights on the binary grid (exact products).
  const int64_t tokens = 3;
  const int k = 2;
  const std::vector<int32_t> slot = {2, 0, -1, 4, 1, 5};
  const std::vector<float> weight = {0.5f, 0.25f, 0.75f, 1.5f, 2.0f, 0.125f};
  const std::vector<float> dy = small_integers(static_cast<size_t>(tokens * cols), 9, 4);
  std::vector<double> ref_combine(static_cast<size_t>(tokens * cols), 0.0), ref_sum(ref_combine),
      ref_grad_src(static_cast<size_t>(src_rows * cols), 3.0), ref_dweight(slot.size(), 0.0);
  for (int64_t t = 0; t < tokens; ++t)
    for (int j = 0; j < k; ++j) {
      const size_t a = static_cast<size_t>(t * k + j);
      if (slot[a] < 0) continue;
      for (int64_t c = 0; c < cols; ++c) {
        const double o = src[static_cast<size_t>(slot[a] * cols + c)];
        const double g = dy[static_cast<size_t>(t * cols + c)];
        ref_combine[static_cast<size_t>(t * cols + c)] += weight[a] * o;
        ref_sum[static_cast<size_t>(t * cols + c)] += o;
        ref_grad_src[static_cast<size_t>(slot[a] * cols + c)] = weight[a] * g;
        ref_dweight[a] += g * o;
      }
    }
  const Tolerance exact{0, 0};
  CrossCheck check_gather("gather_rows", ref_gather, exact), check_scatter("scatter_add_rows", ref_scatter, exact),
      check_combine("gather_sum_rows", ref_combine, exact), check_sum("gather_sum_rows (weight 1)", ref_sum, exact),
      check_grad("gather_sum_rows_backward grad_src", ref_grad_src, exact),
      check_dweight("gather_sum_rows_backward dweight", ref_dweight, exact);
  for (const auto& backend : backends_under_test()) {
    const Device dev = backend->device();
    const Tensor tsrc = on(*backend, {src_rows, cols}, src);
    const Tensor tindex = on_i32(*backend, index), tplan = on_i32(*backend, plan.packed);
    Tensor tg = Tensor::empty({n, cols}, DType::kF32, dev);
    backend->gather_rows(tsrc.device_f32(), tindex.device_i32(), tg.device_f32(), n, cols);
    check_gather.check(*backend, read(*backend, tg));
    Tensor tsc = on(*backend, {src_rows, cols}, std::vector<float>(static_cast<size_t>(src_rows * cols), 1.0f));
    backend->scatter_add_rows(tsrc.device_f32(), tindex.device_i32(), tplan.device_i32(), plan.groups, tsc.device_f32(),
                              n, cols);
    check_scatter.check(*backend, read(*backend, tsc));

    const Tensor tslot = on_i32(*backend, slot);
    const Tensor tw = on(*backend, {tokens * k}, weight);
    const Tensor tdy = on(*backend, {tokens, cols}, dy);
    Tensor ty = on(*backend, {tokens, cols}, std::vector<float>(static_cast<size_t>(tokens * cols), 9.0f));
    backend->gather_sum_rows(tsrc.device_f32(), tslot.device_i32(), tw.device_f32(), ty.device_f32(), tokens, k, cols);
    check_combine.check(*backend, read(*backend, ty));
    backend->gather_sum_rows(tsrc.device_f32(), tslot.device_i32(), nullptr, ty.device_f32(), tokens, k, cols);
    check_sum.check(*backend, read(*backend, ty));
    Tensor tgrad = on(*backend, {src_rows, cols}, std::vector<float>(static_cast<size_t>(src_rows * cols), 3.0f));
    Tensor tdw = on(*backend, {tokens * k}, std::vector<float>(slot.size(), 9.0f));
    backend->gather_sum_rows_backward(tdy.device_f32(), tsrc.device_f32(), tslot.device_i32(), tw.device_f32(),
                                      tgrad.device_f32(), tdw.device_f32(), tokens, k, cols);
    check_grad.check(*backend, read(*backend, tgrad));
    check_dweight.check(*backend, read(*backend, tdw));
  }
}

TEST_CASE("attention head permutations match their index map and invert, and the causal mask") {
  const int64_t B = 2, S = 5, G = 3, H = 4, d = 3;
  const int64_t n = B * S * G * H * d;
  std::vector<float> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) x[static_cast<size_t>(i)] = static_cast<float>(i);
  // y [G, B, H, S, d] from x [B, S, G, H, d], written out with loops (not the shared index map).
  std::vector<double> ref_y;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t s = 0; s < S; ++s)
          for (int64_t e = 0; e < d; ++e) ref_y.push_back(static_cast<double>((((b * S + s) * G + g) * H + h) * d + e));
  const std::vector<float> scores = random_values(static_cast<size_t>(B * S * S), 70);
  std::vector<double> ref_mask;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < S; ++t)
      for (int64_t u = 0; u < S; ++u)
        ref_mask.push_back(u > t ? -INFINITY : double{scores[static_cast<size_t>((b * S + t) * S + u)]});
  const Tolerance exact{0, 0};
  CrossCheck check_split("split_heads", ref_y, exact), check_merge("merge_heads", widen(x), exact);
  for (const auto& backend : backends_under_test()) {
    const Device dev = backend->device();
    const Tensor tx = on(*backend, {n}, x);
    Tensor ty = Tensor::empty({n}, DType::kF32, dev), tback = Tensor::empty({n}, DType::kF32, dev);
    backend->split_heads(tx.device_f32(), ty.device_f32(), B, S, G, H, d);
    check_split.check(*backend, read(*backend, ty));
    backend->merge_heads(ty.device_f32(), tback.device_f32(), B, S, G, H, d);
    check_merge.check(*backend, read(*backend, tback));
    Tensor ts = on(*backend, {B, S, S}, scores);
    backend->causal_mask(ts.device_f32(), B, S);
    const std::vector<float> masked = read(*backend, ts);
    REQUIRE(masked.size() == ref_mask.size());
    for (size_t i = 0; i < masked.size(); ++i) CHECK(double{masked[i]} == ref_mask[i]);  // -inf == -inf
  }
}

// ---- softmax backward and cross-entropy ----------------------------------------------------------

TEST_CASE("softmax backward matches a double reference, in place too") {
  const auto backends = backends_under_test();
  uint32_t seed = 80;
  for (const auto& [rows, cols] : {std::pair<int64_t, int64_t>{6, 33}, {3, 700}, {2, 1}}) {
    const size_t n = static_cast<size_t>(rows * cols);
    const std::vector<float> x = random_values(n, seed++, -4.0f, 4.0f), dy = random_values(n, seed++);
    std::vector<float> y(n);
    for (int64_t r = 0; r < rows; ++r) kernels::softmax_row(&x[static_cast<size_t>(r * cols)], &y[static_cast<size_t>(r * cols)], cols);
    std::vector<double> ref(n);
    for (int64_t r = 0; r < rows; ++r) {
      double dot = 0;
      for (int64_t j = 0; j < cols; ++j) dot += double{y[static_cast<size_t>(r * cols + j)]} * dy[static_cast<size_t>(r * cols + j)];
      for (int64_t j = 0; j < cols; ++j) {
        const size_t i = static_cast<size_t>(r * cols + j);
        ref[i] = y[i] * (dy[i] - dot);
      }
    }
    const std::string what = fmt::format("softmax_backward {}x{}", rows, cols);
    CrossCheck check(what, ref, f32_sum(cols)), check_in_place(what + " in place", ref, f32_sum(cols));
    for (const auto& backend : backends) {
      const Tensor ty = on(*backend, {rows, cols}, y), tdy = on(*backend, {rows, cols}, dy);
      Tensor tdx = Tensor::empty({rows, cols}, DType::kF32, backend->device());
      backend->softmax_backward_rows(ty.device_f32(), tdy.device_f32(), tdx.device_f32(), rows, cols);
      check.check(*backend, read(*backend, tdx));
      Tensor tinplace = tdy.clone();
      backend->softmax_backward_rows(ty.device_f32(), tinplace.device_f32(), tinplace.device_f32(), rows, cols);
      check_in_place.check(*backend, read(*backend, tinplace));
    }
  }
}

TEST_CASE("cross-entropy rows match a double reference: losses and gradients") {
  const auto backends = backends_under_test();
  uint32_t seed = 90;
  for (const auto& [rows, V] : {std::pair<int64_t, int64_t>{9, 64}, {3, 1000}, {2, 1}}) {
    const size_t n = static_cast<size_t>(rows * V);
    std::vector<float> z = random_values(n, seed++, -6.0f, 6.0f);
    if (V > 1) z[0] = 500.0f;  // a dominant logit: the max subtraction keeps exp() finite
    std::vector<int32_t> targets;
    for (int64_t r = 0; r < rows; ++r) targets.push_back(static_cast<int32_t>((r * 37) % V));
    const double scale = 1.0 / static_cast<double>(rows);
    std::vector<double> ref_loss, ref_dz(n);
    for (int64_t r = 0; r < rows; ++r) {
      const float* zr = &z[static_cast<size_t>(r * V)];
      double m = -INFINITY, sum = 0;
      for (int64_t v = 0; v < V; ++v) m = std::max(m, double{zr[v]});
      for (int64_t v = 0; v < V; ++v) sum += std::exp(zr[v] - m);
      const int32_t y = targets[static_cast<size_t>(r)];
      ref_loss.push_back(m + std::log(sum) - zr[y]);
      for (int64_t v = 0; v < V; ++v)
        ref_dz[static_cast<size_t>(r * V + v)] = (std::exp(zr[v] - m) / sum - (v == y ? 1.0 : 0.0)) * scale;
    }
    const std::string what = fmt::format("cross_entropy {}x{}", rows, V);
    CrossCheck check_loss(what + " row losses", ref_loss, kF32), check_dz(what + " dlogits", ref_dz, kF32);
    for (const auto& backend : backends) {
      const Device dev = backend->device();
      const Tensor tz = on(*backend, {rows, V}, z);
      const Tensor ty = Tensor::from_i32({rows}, targets.data(), targets.size(), dev);
      Tensor tdz = Tensor::empty({rows, V}, DType::kF32, dev);
      Tensor tloss = Tensor::empty({rows}, DType::kF64, dev);
      backend->cross_entropy(tz.device_f32(), ty.device_i32(), tdz.device_f32(), tloss.device_f64(), rows, V, scale);
      backend->synchronize();
      const std::vector<double> losses = tloss.to_f64_vector();
      check_loss.check(*backend, std::vector<float>(losses.begin(), losses.end()));
      check_dz.check(*backend, read(*backend, tdz));
    }
  }
}

// ---- the MoE router: gate noise and backward ------------------------------------------------------

TEST_CASE("gate noise is the counter-based normal draw on every back end") {
  const int64_t tokens = 50;
  const int experts = 7;
  const uint64_t key = 12345, step = 3;
  const int64_t offset = 100;
  const float sigma = 0.25f;
  const std::vector<float> logits = random_values(static_cast<size_t>(tokens * experts), 95);
  std::vector<double> ref;
  double sum = 0, sum_sq = 0;
  for (int64_t t = 0; t < tokens; ++t)
    for (int e = 0; e < experts; ++e) {
      const double eps = kernels::gate_noise_sample(key, step, offset + t, e);
      sum += eps;
      sum_sq += eps * eps;
      ref.push_back(logits[static_cast<size_t>(t * experts + e)] + double{sigma} * eps);
    }
  // Roughly standard normal: 350 draws.
  CHECK(std::fabs(sum / 350) < 0.2);
  CHECK(sum_sq / 350 == Approx(1.0).margin(0.25));
  CrossCheck check("gate_noise", ref, kF32);
  for (const auto& backend : backends_under_test()) {
    const Tensor tl = on(*backend, {tokens, experts}, logits);
    Tensor tn = Tensor::empty({tokens, experts}, DType::kF32, backend->device());
    backend->gate_noise(tl.device_f32(), tn.device_f32(), tokens, experts, key, step, offset, sigma);
    check.check(*backend, read(*backend, tn));
  }
}

TEST_CASE("router backward matches a double reference with every term on") {
  const int64_t T = 11;
  const int E = 5, k = 2;
  const double sigma = 0.3;
  for (bool renormalize : {false, true}) {
    const std::vector<float> logits = random_values(static_cast<size_t>(T * E), 101, -2.0f, 2.0f);
    std::vector<float> probs(logits.size());
    for (int64_t t = 0; t < T; ++t)
      kernels::softmax_row(&logits[static_cast<size_t>(t * E)], &probs[static_cast<size_t>(t * E)], E);
    std::vector<int32_t> choice(static_cast<size_t>(T * k));
    std::vector<float> gate_w(choice.size()), eta(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) {
      choice[static_cast<size_t>(t * k)] = static_cast<int32_t>(t % E);
      choice[static_cast<size_t>(t * k + 1)] = static_cast<int32_t>((t + 2) % E);
      const float p0 = probs[static_cast<size_t>(t * E + t % E)], p1 = probs[static_cast<size_t>(t * E + (t + 2) % E)];
      gate_w[static_cast<size_t>(t * k)] = renormalize ? p0 / (p0 + p1) : p0;
      gate_w[static_cast<size_t>(t * k + 1)] = renormalize ? p1 / (p0 + p1) : p1;
      eta[static_cast<size_t>(t)] = logits[static_cast<size_t>(t * E + (t + 2) % E)];
    }
    const std::vector<float> dgate = random_values(choice.size(), 102);
    const std::vector<double> dp_const = {0.01, -0.02, 0.03, 0.0, 0.05}, load_coef = {0.1, 0.2, -0.1, 0.05, 0.0};
    std::vector<int32_t> dataset(static_cast<size_t>(T), -1);
    dataset[1] = 0;
    dataset[4] = 1;
    const std::vector<int32_t> damex_expert = {3, 0};
    const double damex_coef = 0.5;

    std::vector<double> ref(static_cast<size_t>(T * E));
    for (int64_t t = 0; t < T; ++t) {
      const float* p = &probs[static_cast<size_t>(t * E)];
      const int32_t* c = &choice[static_cast<size_t>(t * k)];
      const float* dg = &dgate[static_cast<size_t>(t * k)];
      std::vector<double> dp(dp_const);
      double sum = 0, dot = 0;
      for (int j = 0; j < k; ++j) {
        sum += p[c[j]];
        dot += double{dg[j]} * gate_w[static_cast<size_t>(t * k + j)];
      }
      for (int j = 0; j < k; ++j) dp[static_cast<size_t>(c[j])] += renormalize ? (dg[j] - dot) / sum : dg[j];
      double pdp = 0;
      for (int e = 0; e < E; ++e) pdp += p[e] * dp[static_cast<size_t>(e)];
      double to_eta = 0;
      for (int e = 0; e < E; ++e) {
        double v = p[e] * (dp[static_cast<size_t>(e)] - pdp);
        const int d = dataset[static_cast<size_t>(t)];
        if (d >= 0) v += damex_coef * (p[e] - (e == damex_expert[static_cast<size_t>(d)] ? 1.0 : 0.0));
        const double u = (logits[static_cast<size_t>(t * E + e)] - eta[static_cast<size_t>(t)]) / sigma;
        const double l = load_coef[static_cast<size_t>(e)] * std::exp(-0.5 * u * u) / std::sqrt(2 * kernels::kPi) / sigma;
        ref[static_cast<size_t>(t * E + e)] = v + l;
        to_eta += l;
      }
      ref[static_cast<size_t>(t * E + c[k - 1])] -= to_eta;
    }
    CrossCheck check(fmt::format("router_backward renormalize={}", renormalize), ref, kF32);
    for (const auto& backend : backends_under_test()) {
      const Device dev = backend->device();
      const Tensor tp = on(*backend, {T, E}, probs), tl = on(*backend, {T, E}, logits), tdg = on(*backend, {T * k}, dgate),
                   tw = on(*backend, {T * k}, gate_w), teta = on(*backend, {T}, eta), tc = on_i32(*backend, choice),
                   tds = on_i32(*backend, dataset), th = on_i32(*backend, damex_expert),
                   tdp = Tensor::from_f64({E}, dp_const.data(), dp_const.size(), dev),
                   tlc = Tensor::from_f64({E}, load_coef.data(), load_coef.size(), dev);
      Tensor tdz = Tensor::empty({T, E}, DType::kF32, dev);
      kernels::RouterBackward a;
      a.probs = tp.device_f32();
      a.choice = tc.device_i32();
      a.dgate = tdg.device_f32();
      a.gate_w = tw.device_f32();
      a.dp_const = tdp.device_f64();
      a.renormalize = renormalize;
      a.dataset = tds.device_i32();
      a.damex_expert = th.device_i32();
      a.damex_coef = damex_coef;
      a.load_coef = tlc.device_f64();
      a.logits = tl.device_f32();
      a.eta = teta.device_f32();
      a.sigma = sigma;
      a.dlogits = tdz.device_f32();
      a.tokens = T;
      a.experts = E;
      a.k = k;
      backend->router_backward(a);
      check.check(*backend, read(*backend, tdz));
    }
  }
}

// ---- optimizer steps --------------------------------------------------------------------------------

TEST_CASE("sgd and adam steps match their formulas in double, and the back ends agree") {
  const int64_t n = 1000;
  const std::vector<float> p0 = random_values(static_cast<size_t>(n), 110), grad = random_values(static_cast<size_t>(n), 111),
                           vel0 = random_values(static_cast<size_t>(n), 112, -0.1f, 0.1f),
                           m0 = random_values(static_cast<size_t>(n), 113, -0.1f, 0.1f),
                           v0 = random_values(static_cast<size_t>(n), 114, 0.0f, 0.01f);
  for (bool nesterov : {false, true}) {
    const kernels::SgdHyper h{0.1f, 0.9f, 0.01f, nesterov};
    std::vector<double> ref_p, ref_v;
    for (size_t i = 0; i < p0.size(); ++i) {
      const double g = grad[i] + double{h.weight_decay} * p0[i];
      const double v = double{h.momentum} * vel0[i] + g;
      ref_v.push_back(v);
      ref_p.push_back(p0[i] - double{h.lr} * (nesterov ? g + double{h.momentum} * v : v));
    }
    CrossCheck check_p(fmt::format("sgd nesterov={} param", nesterov), ref_p, kF32),
        check_v(fmt::format("sgd nesterov={} velocity", nesterov), ref_v, kF32);
    for (const auto& backend : backends_under_test()) {
      Tensor tp = on(*backend, {n}, p0), tv = on(*backend, {n}, vel0);
      const Tensor tg = on(*backend, {n}, grad);
      backend->sgd_step(tp.device_f32(), tg.device_f32(), tv.device_f32(), n, h);
      check_p.check(*backend, read(*backend, tp));
      check_v.check(*backend, read(*backend, tv));
    }
  }
  kernels::AdamHyper h;
  h.step_size = 0.01f;
  h.bc2_sqrt = 0.3f;
  h.decay = 0.999f;
  h.l2 = 0.0f;
  std::vector<double> ref_p, ref_m, ref_v;
  for (size_t i = 0; i < p0.size(); ++i) {
    const double g = grad[i];
    const double m = double{h.beta1} * m0[i] + (1 - double{h.beta1}) * g;
    const double v = double{h.beta2} * v0[i] + (1 - double{h.beta2}) * g * g;
    ref_m.push_back(m);
    ref_v.push_back(v);
    ref_p.push_back(p0[i] * double{h.decay} - double{h.step_size} * m / (std::sqrt(v) / h.bc2_sqrt + h.eps));
  }
  // Adam divides by sqrt(v) ~ 0.05 after a few roundings: a few fp32 ulps of p.
  CrossCheck check_p("adam param", ref_p, {1e-6, 1e-5}), check_m("adam m", ref_m, kF32), check_v("adam v", ref_v, kF32);
  for (const auto& backend : backends_under_test()) {
    Tensor tp = on(*backend, {n}, p0), tm = on(*backend, {n}, m0), tv = on(*backend, {n}, v0);
    const Tensor tg = on(*backend, {n}, grad);
    backend->adam_step(tp.device_f32(), tg.device_f32(), tm.device_f32(), tv.device_f32(), n, h);
    check_p.check(*backend, read(*backend, tp));
    check_m.check(*backend, read(*backend, tm));
    check_v.check(*backend, read(*backend, tv));
  }
  // Many tensors at once, more than one launch takes and of unequal sizes (one empty), step as
  // each alone: bit for bit, each tensor its own slice of the same values.
  for (const auto& backend : backends_under_test()) {
    CAPTURE(backend->name());
    const int count = kAdamTensorsPerLaunch + 5;
    std::vector<Tensor> ps, gs, ms, vs, alone;
    std::vector<AdamTensor> tensors;
    for (int t = 0; t < count; ++t) {
      const int64_t begin = (t * 37) % 500, size = t == 3 ? 0 : 1 + (t * 53) % 500;
      auto slice = [&](const std::vector<float>& v) {
        return std::vector<float>(v.begin() + begin, v.begin() + begin + size);
      };
      ps.push_back(on(*backend, {size}, slice(p0)));
      gs.push_back(on(*backend, {size}, slice(grad)));
      ms.push_back(on(*backend, {size}, slice(m0)));
      vs.push_back(on(*backend, {size}, slice(v0)));
      tensors.push_back({ps.back().device_f32(), gs.back().device_f32(), ms.back().device_f32(), vs.back().device_f32(), size});
      Tensor p = on(*backend, {size}, slice(p0)), m = on(*backend, {size}, slice(m0)), v = on(*backend, {size}, slice(v0));
      backend->adam_step(p.device_f32(), gs.back().device_f32(), m.device_f32(), v.device_f32(), size, h);
      for (Tensor* x : {&p, &m, &v}) alone.push_back(*x);
    }
    backend->adam_step_many(tensors.data(), tensors.size(), h);
    for (int t = 0; t < count; ++t) {
      CAPTURE(t);
      CHECK(read(*backend, ps[t]) == read(*backend, alone[3 * t]));
      CHECK(read(*backend, ms[t]) == read(*backend, alone[3 * t + 1]));
      CHECK(read(*backend, vs[t]) == read(*backend, alone[3 * t + 2]));
    }
  }
}

// calibrate runs the kernels' families and the collectives' apart (its in-situ step between
// them); the row gathers' kernels are timed side by side on each shape.
TEST_CASE("microbenchmarks run the families asked for, the gather kernels on the shapes given") {
  const std::unique_ptr<Backend> cpu = make_cpu_backend(1);
  MicrobenchOptions o;
  o.quick = true;
  o.min_sample_s = 1e-4;
  o.kernels = false;
  const Microbenchmarks none = run_microbenchmarks(*cpu, nullptr, o);
  CHECK(none.launch_s == 0);
  CHECK(none.gemm.empty());
  CHECK(none.gather.empty());
  CHECK(none.gather_kernels.empty());
  CHECK(none.capacity.empty());
  o.kernels = true;
  const Microbenchmarks m = run_microbenchmarks(*cpu, nullptr, o);
  CHECK(m.launch_s > 0);
  CHECK_FALSE(m.gemm.empty());
  CHECK_FALSE(m.gather.empty());
  REQUIRE(m.gather_kernels.size() == 2);  // quick: 256 tokens, 64 and 256 wide
  for (const GatherKernels& g : m.gather_kernels) {
    CHECK(g.tokens == 256);
    CHECK(g.table_rows == 64);
    for (double t : {g.copy_s, g.sum_s, g.lookup_s, g.sum_backward_s, g.combine_backward_s, g.scatter_add_s}) CHECK(t > 0);
  }
  CHECK(m.gather_kernels[0].cols == 64);
  CHECK(m.gather_kernels[1].cols == 256);
  CHECK(m.all_to_all.empty());  // one rank: no collectives
}
