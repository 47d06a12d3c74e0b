// Never crash on bad input: seeded random mutations of small valid configs either load (and then
// route and derive figures) or fail with a ConfigError; nothing else may escape, nothing may hang.
#include "common/error.h"
#include "topologies/metrics.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <fstream>
#include <random>
#include <regex>
#include <sstream>

using namespace moesim;

namespace {

std::string read(const std::string& rel) {
  std::ifstream in(std::string(MOESIM_SOURCE_DIR) + "/" + rel);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// One random edit: replace a number, drop a line, duplicate a line, or cut the text short.
std::string mutate(const std::string& text, std::mt19937_64& rng) {
  static const std::vector<std::string> kNumbers = {"0", "-1", "nan", "inf", "-inf", "1e300", "1e-300", "3",
                                                    "2147483647", "-2147483648", "99999999999", "0.5", "1e20"};
  std::vector<std::string> lines;
  std::stringstream ss(text);
  for (std::string l; std::getline(ss, l);) lines.push_back(l);
  if (lines.empty()) return "nodes: 1\n";
  const size_t i = rng() % lines.size();
  switch (rng() % 5) {
    case 0:
    case 1: {  // replace the first number on a line
      static const std::regex kNumber(R"((-?\d+(\.\d+)?(e-?\d+)?))");
      lines[i] = std::regex_replace(lines[i], kNumber, kNumbers[rng() % kNumbers.size()],
                                    std::regex_constants::format_first_only);
      break;
    }
    case 2: lines.erase(lines.begin() + i); break;
    case 3: lines.insert(lines.begin() + i, lines[i]); break;
    default: lines.resize(i); break;
  }
  std::string out;
  for (const std::string& l : lines) out += l + "\n";
  return out;
}

}  // namespace

TEST_CASE("mutated configs load or fail with a ConfigError, never anything else") {
  const std::vector<std::string> bases = {"configs/hardware/dgx-h100.textproto", "configs/hardware/pcie-8gpu.textproto",
                                          "configs/hardware/mi300x-8.textproto",
                                          "configs/hardware/examples/explicit-fabric.textproto",
                                          "configs/hardware/examples/explicit-graph.textproto",
                                          "configs/hardware/examples/torus-3d-64.textproto"};
  std::mt19937_64 rng(20261125);  // fixed seed: the same mutations every run
  int loaded = 0, refused = 0;
  for (const std::string& base : bases) {
    std::string text = read(base);
    REQUIRE_FALSE(text.empty());
    for (int round = 0; round < 60; ++round) {
      std::string mutated = mutate(text, rng);
      if (rng() % 2) mutated = mutate(mutated, rng);  // sometimes two edits
      INFO(base << " mutation " << round << ":\n" << mutated);
      try {
        topo::Cluster c = topo::load_cluster_text(mutated, "mutated.textproto");
        if (c.device_count() > 4096) continue;  // valid but big: not this test's business
        topo::TopologyMetrics m = topo::compute_metrics(c);
        CHECK(m.devices.size() == static_cast<size_t>(c.device_count()));
        CHECK(std::isfinite(m.bisection_bandwidth_Bps));
        ++loaded;
      } catch (const ConfigError& e) {
        CHECK_FALSE(e.diagnostics().empty());
        for (const Diagnostic& d : e.diagnostics()) CHECK(d.file == "mutated.textproto");
        ++refused;
      }
    }
  }
  // Both outcomes occur, so the test exercises both paths.
  CHECK(loaded > 20);
  CHECK(refused > 20);
}
