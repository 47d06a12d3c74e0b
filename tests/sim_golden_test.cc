// A golden-trace regression test: the bundled example scenario (every parallelism at once on one
// DGX H100, max-min flows) simulated and exported as Chrome-trace JSON must match
// tests/golden/tiny_moe_dgx_trace.json: every event, name, thread and time (numbers within 1e-9
// relative, so a change of compiler flags that moves the last bit does not fail it, while any change
// of the model does). After an intended change of the simulator, regenerate it with
//   MOESIM_UPDATE_GOLDEN=1 build/tests/sim_golden_test
// and review the diff like code.
#include "schedule/lowering.h"
#include "sim/engine.h"
#include "sim/scenario.h"
#include "traces/chrome_trace.h"

#include <catch2/catch.hpp>
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>

using namespace moesim;
using google::protobuf::Value;

namespace {

const std::string kScenario = std::string(MOESIM_SOURCE_DIR) + "/configs/scenarios/examples/tiny-moe-dgx.textproto";
const std::string kGolden = std::string(MOESIM_SOURCE_DIR) + "/tests/golden/tiny_moe_dgx_trace.json";

std::string simulate_json() {
  const sim::Scenario s = sim::load_scenario(kScenario);
  schedule::LoweringOptions lo;
  lo.seed = s.seed;
  const schedule::Schedule sch = schedule::lower(s.setup, lo);
  sim::SimOptions so;
  so.network = sim::NetworkMode::kFlows;
  return trace::chrome_trace_json(sim::simulate(sch, *s.setup.cluster, so).trace);
}

Value parse(const std::string& json) {
  Value v;
  REQUIRE(google::protobuf::util::JsonStringToMessage(json, &v).ok());
  return v;
}

// Walks both documents; returns the path of the first difference, empty when they match.
std::string diff(const Value& a, const Value& b, const std::string& path) {
  if (a.kind_case() != b.kind_case()) return path + ": different types";
  switch (a.kind_case()) {
    case Value::kNumberValue: {
      const double x = a.number_value(), y = b.number_value();
      return std::abs(x - y) <= 1e-9 * std::max(std::abs(x), std::abs(y)) ? "" : path + ": " + std::to_string(x) + " vs " + std::to_string(y);
    }
    case Value::kStringValue: return a.string_value() == b.string_value() ? "" : path + ": '" + a.string_value() + "' vs '" + b.string_value() + "'";
    case Value::kBoolValue: return a.bool_value() == b.bool_value() ? "" : path + ": bool";
    case Value::kListValue: {
      if (a.list_value().values_size() != b.list_value().values_size())
        return path + ": " + std::to_string(a.list_value().values_size()) + " vs " + std::to_string(b.list_value().values_size()) + " items";
      for (int i = 0; i < a.list_value().values_size(); ++i) {
        std::string d = diff(a.list_value().values(i), b.list_value().values(i), path + "[" + std::to_string(i) + "]");
        if (!d.empty()) return d;
      }
      return "";
    }
    case Value::kStructValue: {
      const auto& fa = a.struct_value().fields();
      const auto& fb = b.struct_value().fields();
      if (fa.size() != fb.size()) return path + ": different keys";
      for (const auto& [k, v] : fa) {
        auto it = fb.find(k);
        if (it == fb.end()) return path + "." + k + ": missing";
        std::string d = diff(v, it->second, path + "." + k);
        if (!d.empty()) return d;
      }
      return "";
    }
    default: return "";
  }
}

}  // namespace

TEST_CASE("the example scenario's simulated timeline matches the golden trace", "[golden]") {
  const std::string json = simulate_json();
  if (std::getenv("MOESIM_UPDATE_GOLDEN")) {
    std::ofstream(kGolden) << json;
    WARN("rewrote " << kGolden);
  }
  std::ifstream in(kGolden);
  REQUIRE(in.good());
  std::stringstream golden;
  golden << in.rdbuf();
  const std::string d = diff(parse(json), parse(golden.str()), "$");
  INFO("first difference at " << d);
  CHECK(d.empty());
  // And the run is deterministic to the byte.
  CHECK(simulate_json() == json);
}
