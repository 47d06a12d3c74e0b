// Helpers for tests of bad input: what a loader reported, as a list and as text.
#pragma once

#include "common/error.h"

#include <catch2/catch.hpp>

#include <string>
#include <vector>

namespace moesim::test {

inline std::string describe(const std::vector<Diagnostic>& diagnostics) {
  std::string out;
  for (const Diagnostic& d : diagnostics) out += d.to_string() + "\n";
  return out;
}

// Every diagnostic `load()` throws; fails the test when it loads without a ConfigError.
template <typename Load>
std::vector<Diagnostic> diagnostics_of(Load&& load, const std::string& what) {
  try {
    load();
  } catch (const ConfigError& e) {
    return e.diagnostics();
  }
  FAIL("loaded without a ConfigError:\n" << what);
  return {};
}

}  // namespace moesim::test
