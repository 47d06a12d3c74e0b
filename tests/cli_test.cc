// End to end: the moesim binary as a user runs it; --json output parsed and checked.
#include "cli/cli.pb.h"
#include "topologies/report.pb.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <google/protobuf/util/json_util.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <sys/wait.h>

using namespace moesim;

namespace {

struct Run {
  int exit_code = -1;
  std::string out;
  std::string err;
};

// Runs `moesim ARGS` from the source tree, capturing stdout and stderr separately.
Run moesim_run(const std::string& args) {
  const std::string err_file = (std::filesystem::temp_directory_path() / fmt::format("moesim_cli_test_{}.err", ::getpid())).string();
  const std::string cmd = fmt::format("cd '{}' && '{}' {} 2>'{}'", MOESIM_SOURCE_DIR, MOESIM_BINARY, args, err_file);
  Run r;
  FILE* pipe = ::popen(cmd.c_str(), "r");
  REQUIRE(pipe != nullptr);
  std::array<char, 4096> buf;
  for (size_t n; (n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0;) r.out.append(buf.data(), n);
  const int status = ::pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream in(err_file);
  std::stringstream ss;
  ss << in.rdbuf();
  r.err = ss.str();
  std::filesystem::remove(err_file);
  return r;
}

template <typename Msg>
Msg parse_json(const std::string& text) {
  Msg msg;
  auto status = google::protobuf::util::JsonStringToMessage(text, &msg);
  INFO(text.substr(0, 500));
  REQUIRE(status.ok());
  return msg;
}

std::string write_temp(const std::string& name, const std::string& text) {
  auto path = std::filesystem::temp_directory_path() / fmt::format("{}_{}", ::getpid(), name);
  std::ofstream(path) << text;
  return path.string();
}

}  // namespace

TEST_CASE("topo show --json carries the derived figures") {
  Run r = moesim_run("topo show configs/hardware/h800-2048.textproto --json");
  REQUIRE(r.exit_code == 0);
  auto rep = parse_json<report::TopologyReport>(r.out);
  CHECK(rep.name() == "h800-2048");
  CHECK(rep.device_count() == 2048);
  CHECK(rep.node_count() == 256);
  CHECK(rep.link_count() > 0);
  CHECK(rep.directed_link_count() == 2 * rep.link_count());
  CHECK(rep.bisection_bandwidth_bps() == Approx(1024 * 50e9));
  CHECK(rep.diameter_hops() == 8);
  REQUIRE(rep.devices_size() == 2048);
  for (const auto& d : rep.devices()) {
    CHECK(d.scaleup_bandwidth_bps() == Approx(200e9));
    CHECK(d.scaleout_bandwidth_bps() == Approx(50e9));
  }
  // Field names as documented: snake case with units.
  CHECK(r.out.find("\"bisection_bandwidth_Bps\"") != std::string::npos);
  CHECK(r.out.find("\"scaleout_bandwidth_Bps\"") != std::string::npos);
  // Routes from device 0 cover every other device.
  int destinations = 0;
  for (const auto& k : rep.routes_from_device0()) destinations += k.destinations();
  CHECK(destinations == 2047);
}

TEST_CASE("topo show prints a table for people") {
  Run r = moesim_run("topo show configs/hardware/dgx-h100.textproto");
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("cluster dgx-h100") != std::string::npos);
  CHECK(r.out.find("450 GB/s") != std::string::npos);
  CHECK(r.err.empty());
}

TEST_CASE("topo check: ok on a good file, every problem and exit 2 on a bad one") {
  Run good = moesim_run("topo check configs/hardware/h100-1024.textproto --json");
  REQUIRE(good.exit_code == 0);
  auto ok = parse_json<cli::CheckResult>(good.out);
  CHECK(ok.ok());
  CHECK(ok.device_count() == 1024);

  const std::string bad = write_temp("bad.textproto",
                                     "name: \"bad\"\n"
                                     "nodes: 2\n"
                                     "node {\n"
                                     "  device { preset: \"h100-sxm5\" }\n"
                                     "  devices_per_node: 0\n"
                                     "  intra_fabric: NVSWITCH\n"
                                     "  scaleup_bandwidth_Bps: -5\n"
                                     "  pcie { device_bandwidth_Bps: 64e9 }\n"
                                     "  nic { bandwidth_Bps: 50e9 }\n"
                                     "}\n");
  Run r = moesim_run(fmt::format("topo check '{}'", bad));
  CHECK(r.exit_code == 2);
  CHECK(r.out.empty());
  CHECK(r.err.find(bad + ":5: node.devices_per_node: must be between 1 and 1024, got 0") != std::string::npos);
  CHECK(r.err.find(bad + ":7: node.scaleup_bandwidth_Bps: must be greater than zero, got -5") != std::string::npos);
  CHECK(r.err.find(bad + ":1: fabric: missing required value") != std::string::npos);

  Run j = moesim_run(fmt::format("topo check '{}' --json", bad));
  CHECK(j.exit_code == 2);
  auto res = parse_json<cli::CheckResult>(j.out);
  CHECK_FALSE(res.ok());
  REQUIRE(res.errors_size() == 3);
  CHECK(res.errors(0).line() == 1);
  CHECK(res.errors(1).field() == "node.devices_per_node");
  CHECK(res.errors(1).line() == 5);
  CHECK(res.errors(2).line() == 7);
  std::filesystem::remove(bad);
}

TEST_CASE("topo show on a bad file fails the same way, with nothing on stdout") {
  const std::string bad = write_temp("syntax.textproto", "name: \"x\"\nnodes: 1\nnode { devices_per_node: }\n");
  Run r = moesim_run(fmt::format("topo show '{}'", bad));
  CHECK(r.exit_code == 2);
  CHECK(r.out.empty());
  CHECK(r.err.find(bad + ":3:") != std::string::npos);
  std::filesystem::remove(bad);
  Run missing = moesim_run("topo show no/such/file.textproto");
  CHECK(missing.exit_code == 2);
  CHECK(missing.err.find("no/such/file.textproto: cannot open file") != std::string::npos);
}

TEST_CASE("topo route spells out a route hop by hop") {
  Run r = moesim_run("topo route configs/hardware/h800-2048.textproto --from node0.gpu0 --to 1603 --paths 3 --json");
  REQUIRE(r.exit_code == 0);
  auto route = parse_json<report::RouteReport>(r.out);
  CHECK(route.from() == "node0.gpu0");
  CHECK(route.to() == "node200.gpu3");  // rank 1603 = node 200, GPU 3
  CHECK(route.hops() == 8);
  CHECK(route.ecmp_paths() == 32);  // one per spine
  REQUIRE(route.paths_size() == 3);
  for (const auto& p : route.paths()) {
    REQUIRE(p.hops_size() == 8);
    CHECK(p.hops(3).vertex().rfind("spine", 0) == 0);
    CHECK(p.hops(7).vertex() == "node200.gpu3");
    CHECK(p.hops(2).link_kind() == "NETWORK");
  }
  CHECK(route.paths(0).hops(3).vertex() != route.paths(1).hops(3).vertex());

  Run bad = moesim_run("topo route configs/hardware/h800-2048.textproto --from node0.gpu0 --to node900.gpu3");
  CHECK(bad.exit_code == 2);
  CHECK(bad.err.find("no device 'node900.gpu3'") != std::string::npos);
  CHECK(moesim_run("topo route configs/hardware/h800-2048.textproto --from 0").exit_code == 2);
}

TEST_CASE("topo dot draws every physical link once") {
  Run r = moesim_run("topo dot configs/hardware/dgx-h100.textproto");
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.rfind("digraph \"dgx-h100\" {", 0) == 0);
  Run show = moesim_run("topo show configs/hardware/dgx-h100.textproto --json");
  auto rep = parse_json<report::TopologyReport>(show.out);
  size_t edges = 0;
  for (size_t p = 0; (p = r.out.find(" -> ", p)) != std::string::npos; ++p) ++edges;
  CHECK(edges == static_cast<size_t>(rep.link_count()));
  CHECK(r.out.find("subgraph \"cluster_node0\"") != std::string::npos);
}

TEST_CASE("list shows the registries") {
  Run r = moesim_run("list --json");
  REQUIRE(r.exit_code == 0);
  auto list = parse_json<cli::ListResult>(r.out);
  bool fat_tree = false, h100 = false;
  for (const auto& reg : list.registries())
    for (const auto& e : reg.entries()) {
      CHECK_FALSE(e.description().empty());
      fat_tree |= e.name() == "fat_tree";
      h100 |= e.name() == "h100-sxm5";
    }
  CHECK(fat_tree);
  CHECK(h100);
  Run text = moesim_run("list");
  CHECK(text.out.find("rail_optimized") != std::string::npos);
}

TEST_CASE("every command has --help, and usage errors exit 2") {
  for (const char* cmd : {"topo show", "topo route", "topo check", "topo dot", "list"}) {
    Run r = moesim_run(fmt::format("{} --help", cmd));
    INFO(cmd);
    CHECK(r.exit_code == 0);
    CHECK(r.out.find("usage: moesim") != std::string::npos);
  }
  CHECK(moesim_run("--help").exit_code == 0);
  CHECK(moesim_run("").exit_code == 2);
  CHECK(moesim_run("frobnicate").exit_code == 2);
  CHECK(moesim_run("topo").exit_code == 2);
  Run unknown = moesim_run("topo show configs/hardware/dgx-h100.textproto --colour");
  CHECK(unknown.exit_code == 2);
  CHECK(unknown.err.find("unknown option --colour") != std::string::npos);
  Run threads = moesim_run("topo show configs/hardware/dgx-h100.textproto --threads lots");
  CHECK(threads.exit_code == 2);
  CHECK(moesim_run("topo show").exit_code == 2);
}
