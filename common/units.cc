#include "common/units.h"

#include <fmt/format.h>

#include <array>
#include <cmath>

namespace moesim {
namespace {

// Scales `v` to the largest SI prefix at or below it; three significant digits.
std::string si(double v, const char* unit) {
  static constexpr std::array<const char*, 7> kPrefix = {"", "k", "M", "G", "T", "P", "E"};
  if (v == 0 || !std::isfinite(v)) return fmt::format("{} {}", v, unit);
  size_t i = 0;
  double a = std::fabs(v);
  while (a >= 1000 && i + 1 < kPrefix.size()) {
    a /= 1000;
    v /= 1000;
    ++i;
  }
  return fmt::format("{:.3g} {}{}", v, kPrefix[i], unit);
}

}  // namespace

std::string format_bytes(double bytes) { return si(bytes, "B"); }
std::string format_bandwidth(double bytes_per_s) { return si(bytes_per_s, "B/s"); }
std::string format_flops(double flops_per_s) { return si(flops_per_s, "FLOP/s"); }

std::string format_count(double n) {
  static constexpr std::array<const char*, 5> kSuffix = {"", "K", "M", "B", "T"};
  size_t i = 0;
  double a = std::fabs(n);
  while (a >= 1000 && i + 1 < kSuffix.size()) {
    a /= 1000;
    n /= 1000;
    ++i;
  }
  return fmt::format("{:.3g}{}", n, kSuffix[i]);
}

std::string format_seconds(double s) {
  double a = std::fabs(s);
  if (a == 0) return "0 s";
  if (a < 1e-6) return fmt::format("{:.3g} ns", s * 1e9);
  if (a < 1e-3) return fmt::format("{:.3g} us", s * 1e6);
  if (a < 1) return fmt::format("{:.3g} ms", s * 1e3);
  return fmt::format("{:.3g} s", s);
}

}  // namespace moesim
