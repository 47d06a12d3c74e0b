// Every bundled config loads; clusters' derived figures match the datasheets they cite; the
// bundled studies (cluster, model, workload, strategy) fit together.
#include "costmodel/memory.h"
#include "topologies/metrics.h"
#include "topologies/routing.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <sstream>

using namespace moesim;

namespace {

std::string config(const std::string& name) { return std::string(MOESIM_SOURCE_DIR) + "/configs/hardware/" + name; }

}  // namespace

TEST_CASE("every bundled hardware config loads and is connected") {
  int seen = 0;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(config(""))) {
    if (entry.path().extension() != ".textproto") continue;
    INFO(entry.path());
    if (entry.path().filename() == "h100-16k.textproto") continue;  // benchmark size: checked by `make bench`
    // `moesim calibrate --out configs/hardware/local.textproto` writes this machine's cluster and
    // profile here; they are not bundled (.gitignore) and the profile is not a cluster.
    if (entry.path().filename().string().rfind("local", 0) == 0) continue;
    topo::Cluster c = topo::load_cluster(entry.path().string());
    CHECK(c.device_count() > 0);
    CHECK_FALSE(c.name().empty());
    ++seen;
  }
  CHECK(seen >= 5);
}

TEST_CASE("dgx-h100: 8 H100 SXM5 on NVSwitch") {
  topo::Cluster c = topo::load_cluster(config("dgx-h100.textproto"));
  topo::TopologyMetrics m = topo::compute_metrics(c);
  CHECK(c.device_count() == 8);
  // NVIDIA H100 datasheet: 989.4 TFLOP/s BF16 dense, 80 GB HBM3 at 3.35 TB/s.
  CHECK(c.device_type(0).peak_flops_per_s().bf16() == Approx(989.4e12));
  CHECK(c.device_type(0).memory_bytes() == Approx(80e9));
  CHECK(c.device_type(0).memory_bandwidth_bps() == Approx(3.35e12));
  // NVLink4: 900 GB/s bidirectional = 450 GB/s per direction per GPU.
  for (const auto& d : m.devices) CHECK(d.scaleup_Bps == Approx(900e9 / 2));
  // PCIe Gen5 x16: 64 GB/s per direction.
  for (const auto& d : m.devices) CHECK(d.host_Bps == Approx(64e9));
  CHECK(m.diameter_hops == 2);
}

TEST_CASE("dgx-a100: 8 A100 SXM4 on NVSwitch, HDR NICs") {
  topo::Cluster c = topo::load_cluster(config("dgx-a100.textproto"));
  topo::TopologyMetrics m = topo::compute_metrics(c);
  // NVIDIA A100 datasheet: 312 TFLOP/s BF16 dense; NVLink3 600 GB/s bidirectional.
  CHECK(c.device_type(0).peak_flops_per_s().bf16() == Approx(312e12));
  CHECK_FALSE(c.device_type(0).peak_flops_per_s().has_fp8());
  for (const auto& d : m.devices) CHECK(d.scaleup_Bps == Approx(600e9 / 2));
}

TEST_CASE("h100-1024: 128 DGX H100, NDR 400 Gb/s per GPU, rail-optimised at 1:1") {
  topo::Cluster c = topo::load_cluster(config("h100-1024.textproto"));
  CHECK(c.device_count() == 1024);
  CHECK(c.node_count() == 128);
  CHECK(c.fabric_kind() == "rail_optimized");
  topo::TopologyMetrics m = topo::compute_metrics(c);
  for (const auto& d : m.devices) CHECK(d.scaleout_Bps == Approx(400e9 / 8));
  // Full bisection: half the GPUs at 50 GB/s each.
  CHECK(m.bisection_bandwidth_Bps == Approx(512 * 50e9));
  CHECK(m.diameter_hops == 8);
}

TEST_CASE("h800-2048: the DeepSeek-V3 cluster") {
  topo::Cluster c = topo::load_cluster(config("h800-2048.textproto"));
  // DeepSeek-V3 technical report, 3.1: 2,048 H800 GPUs, 8 per node.
  CHECK(c.device_count() == 2048);
  CHECK(c.node_count() == 256);
  topo::TopologyMetrics m = topo::compute_metrics(c);
  for (const auto& d : m.devices) {
    CHECK(d.scaleup_Bps == Approx(400e9 / 2));  // H800 NVLink 400 GB/s bidirectional
    CHECK(d.scaleout_Bps == Approx(50e9));      // 400 Gb/s InfiniBand per GPU
  }
  CHECK(m.bisection_bandwidth_Bps == Approx(1024 * 50e9));
  CHECK(m.diameter_hops == 8);
  // From GPU 0: 7 peers over NVLink, 3 nodes x 8 GPUs under the same leaf (32 NICs a leaf), the
  // rest across one of the 32 spines.
  REQUIRE(m.route_classes.size() == 3);
  CHECK(m.route_classes[0].destinations == 7);
  CHECK(m.route_classes[1].destinations == 24);
  CHECK(m.route_classes[1].paths == 1);
  CHECK(m.route_classes[2].destinations == 2016);
  CHECK(m.route_classes[2].paths == 32);
}

TEST_CASE("pcie-8gpu: no scale-up links, routes through PCIe switches and CPUs") {
  topo::Cluster c = topo::load_cluster(config("pcie-8gpu.textproto"));
  topo::TopologyMetrics m = topo::compute_metrics(c);
  for (const auto& d : m.devices) CHECK(d.scaleup_Bps == 0);
  topo::Router router(c);
  CHECK(router.route(0, 1).hops == 2);  // same PCIe switch
  CHECK(router.route(0, 2).hops == 4);  // through socket 0
  CHECK(router.route(0, 4).hops == 5);  // across the socket link
  // GPUs 0-3 vs 4-7: everything crosses the one inter-socket link.
  CHECK(m.bisection_bandwidth_Bps == Approx(64e9));
}

TEST_CASE("mi300x-8: Infinity Fabric mesh, 64 GB/s to each peer") {
  topo::Cluster c = topo::load_cluster(config("mi300x-8.textproto"));
  topo::Route r = topo::Router(c).route(0, 7);
  CHECK(r.hops == 1);
  CHECK(r.bottleneck_Bps == Approx(448e9 / 7));
}

TEST_CASE("the README's config example is valid and means what it says") {
  std::ifstream in(std::string(MOESIM_SOURCE_DIR) + "/README.md");
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string readme = ss.str();
  const size_t start = readme.find("```\nname: \"two-dgx\"");
  REQUIRE(start != std::string::npos);
  const size_t end = readme.find("```", start + 3);
  topo::Cluster c = topo::load_cluster_text(readme.substr(start + 4, end - start - 4), "README.md");
  CHECK(c.device_count() == 16);
  topo::TopologyMetrics m = topo::compute_metrics(c);
  for (const auto& d : m.devices) {
    CHECK(d.scaleup_Bps == Approx(450e9));
    CHECK(d.scaleout_Bps == Approx(50e9));
  }
}

TEST_CASE("h100-64: 8 DGX H100 on one rail-optimised unit") {
  topo::Cluster c = topo::load_cluster(config("h100-64.textproto"));
  CHECK(c.device_count() == 64);
  CHECK(c.node_count() == 8);
  // Rail-optimised at 1:1: a GPU reaches a GPU of another node at its NIC's 400 Gb/s = 50 GB/s.
  topo::Router router(c);
  CHECK(router.route(0, 8).bottleneck_Bps == 50e9);
}

namespace {

std::string source(const std::string& path) { return std::string(MOESIM_SOURCE_DIR) + "/" + path; }

int load_all(const std::string& folder, void (*load)(const std::string&)) {
  int seen = 0;
  for (const auto& entry : std::filesystem::directory_iterator(source(folder))) {
    if (entry.path().extension() != ".textproto") continue;
    INFO(entry.path());
    CHECK_NOTHROW(load(entry.path().string()));
    ++seen;
  }
  return seen;
}

}  // namespace

TEST_CASE("every bundled model, workload and strategy loads") {
  CHECK(load_all("configs/models", [](const std::string& p) { cost::load_model(p); }) >= 7);
  CHECK(load_all("configs/workloads", [](const std::string& p) { cost::load_workload(p); }) >= 4);
  CHECK(load_all("configs/strategies", [](const std::string& p) { cost::load_strategy(p); }) >= 4);
}

TEST_CASE("the bundled studies fit together and fit in memory") {
  struct Study {
    const char* cluster;
    const char* model;
    const char* workload;
    const char* strategy;
  };
  const Study studies[] = {
      {"h800-2048", "deepseek-v3", "deepseek-v3-pretrain", "deepseek-v3-published"},
      {"h100-64", "mixtral-8x7b", "mixtral-8x7b-train", "mixtral-8x7b-megatron"},
      {"dgx-h100", "mixtral-8x7b", "mixtral-8x7b-serve", "mixtral-8x7b-serve-ep8"},
      {"dgx-a100", "vmoe-b16", "vmoe-b16-train", "vmoe-b16-ep8"},
      {"dgx-a100", "resnet50-reid", "reid-train", "reid-dp8"},
  };
  for (const Study& s : studies) {
    INFO(s.model << " / " << s.strategy);
    const cost::Setup setup = cost::load_setup(
        source(fmt::format("configs/hardware/{}.textproto", s.cluster)), source(fmt::format("configs/models/{}.textproto", s.model)),
        source(fmt::format("configs/workloads/{}.textproto", s.workload)),
        source(fmt::format("configs/strategies/{}.textproto", s.strategy)));
    const cost::MemoryReport m = cost::estimate_memory(setup);
    CHECK(m.fits);
    CHECK(m.ranks.size() == static_cast<size_t>(setup.cluster->device_count()));
  }
}
