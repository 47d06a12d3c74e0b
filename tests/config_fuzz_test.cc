// Never crash on bad input: seeded random mutations of small valid configs either load (and then
// route and derive figures) or fail with a ConfigError; nothing else may escape, nothing may hang.
#include "common/error.h"
#include "costmodel/memory.h"
#include "topologies/metrics.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <regex>
#include <sstream>
#include <unistd.h>

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

TEST_CASE("mutated models, workloads and strategies load or fail with a ConfigError, never anything else") {
  struct Study {
    std::string cluster, model, workload, strategy;
  };
  const std::vector<Study> studies = {
      {"h100-64", "mixtral-8x7b", "mixtral-8x7b-train", "mixtral-8x7b-megatron"},
      {"dgx-h100", "mixtral-8x7b", "mixtral-8x7b-serve", "mixtral-8x7b-serve-ep8"},
      {"dgx-a100", "vmoe-b16", "vmoe-b16-train", "vmoe-b16-ep8"},
      {"dgx-a100", "resnet50-reid", "reid-train", "reid-dp8"},
  };
  const auto dir = std::filesystem::temp_directory_path() / ("moesim_fuzz_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::mt19937_64 rng(20261126);
  int loaded = 0, refused = 0;
  for (const Study& st : studies) {
    const std::string base[3] = {read("configs/models/" + st.model + ".textproto"),
                                 read("configs/workloads/" + st.workload + ".textproto"),
                                 read("configs/strategies/" + st.strategy + ".textproto")};
    for (int round = 0; round < 45; ++round) {
      std::string text[3] = {base[0], base[1], base[2]};
      const int which = static_cast<int>(rng() % 3);
      text[which] = mutate(text[which], rng);
      if (rng() % 2) text[which] = mutate(text[which], rng);
      std::string path[3];
      for (int i = 0; i < 3; ++i) {
        path[i] = (dir / fmt::format("f{}.textproto", i)).string();
        std::ofstream(path[i]) << text[i];
      }
      INFO(st.model << " mutation " << round << " of file " << which << ":\n" << text[which]);
      try {
        const cost::Setup s = cost::load_setup(std::string(MOESIM_SOURCE_DIR) + "/configs/hardware/" + st.cluster + ".textproto",
                                               path[0], path[1], path[2]);
        const cost::MemoryReport m = cost::estimate_memory(s);
        CHECK(std::isfinite(m.ranks[m.peak_rank].total_bytes));
        CHECK(std::isfinite(s.cost.flops_fwd));
        CHECK(s.cost.total_params > 0);
        ++loaded;
      } catch (const ConfigError& e) {
        CHECK_FALSE(e.diagnostics().empty());
        for (const Diagnostic& d : e.diagnostics()) CHECK(d.file == path[which]);
        ++refused;
      }
    }
  }
  std::filesystem::remove_all(dir);
  CHECK(loaded > 20);
  CHECK(refused > 20);
}
