#include "cli/args.h"

#include <fmt/format.h>

#include <charconv>
#include <cmath>

namespace moesim::cli {

Args::Args(const std::vector<std::string>& argv, const ArgSpec& spec) {
  for (size_t i = 0; i < argv.size(); ++i) {
    const std::string& a = argv[i];
    if (a.size() < 2 || a.compare(0, 2, "--") != 0 || a == "--") {
      positional_.push_back(a);
      continue;
    }
    const size_t eq = a.find('=');
    const std::string name = a.substr(0, eq);
    if (spec.flags.count(name)) {
      if (eq != std::string::npos) throw UsageError(fmt::format("{} takes no value", name));
      flags_.insert(name);
    } else if (spec.options.count(name)) {
      if (eq != std::string::npos) {
        options_[name] = a.substr(eq + 1);
      } else if (i + 1 < argv.size()) {
        options_[name] = argv[++i];
      } else {
        throw UsageError(fmt::format("{} needs a value", name));
      }
    } else {
      throw UsageError(fmt::format("unknown option {}", name));
    }
  }
}

std::string Args::get(const std::string& name, const std::string& fallback) const {
  auto it = options_.find(name);
  return it == options_.end() ? fallback : it->second;
}

int Args::get_int(const std::string& name, int fallback, int lo, int hi) const {
  auto it = options_.find(name);
  if (it == options_.end()) return fallback;
  int v = 0;
  const std::string& s = it->second;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || v < lo || v > hi)
    throw UsageError(fmt::format("{} must be an integer between {} and {}, got '{}'", name, lo, hi, s));
  return v;
}

double Args::get_double(const std::string& name, double fallback, double lo, double hi) const {
  auto it = options_.find(name);
  if (it == options_.end()) return fallback;
  double v = 0;
  const std::string& s = it->second;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || !std::isfinite(v) || v < lo || v > hi)
    throw UsageError(fmt::format("{} must be a number between {:g} and {:g}, got '{}'", name, lo, hi, s));
  return v;
}

}  // namespace moesim::cli
