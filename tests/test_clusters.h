// Small parametric clusters for tests, written as text so that they go through the same parsing
// and validation as users' files. One PCIe switch per device, so NIC i sits beside device i and
// path counts come out of the fabric alone.
#pragma once

#include "topologies/cluster.h"

#include <fmt/format.h>

#include <string>

namespace moesim::test {

struct SmallNode {
  int devices = 2;
  int nics = 2;
  double nic_Bps = 10e9;
  double pcie_Bps = 64e9;
  double scaleup_Bps = 100e9;
  std::string intra = "NVSWITCH";
};

inline std::string node_block(const SmallNode& n) {
  std::string scaleup = n.intra == "PCIE_TREE" ? "" : fmt::format("scaleup_bandwidth_Bps: {} scaleup_latency_s: 1e-6", n.scaleup_Bps);
  std::string nic = n.nics > 0 ? fmt::format("nic {{ count: {} bandwidth_Bps: {} latency_s: 1e-6 }}", n.nics, n.nic_Bps) : "";
  return fmt::format(
      "node {{\n"
      "  device {{ preset: \"h100-sxm5\" }}\n"
      "  devices_per_node: {}\n"
      "  intra_fabric: {}\n"
      "  {}\n"
      "  pcie {{ device_bandwidth_Bps: {} latency_s: 100e-9 }}\n"
      "  {}\n"
      "}}\n",
      n.devices, n.intra, scaleup, n.pcie_Bps, nic);
}

// A cluster of `nodes` SmallNodes joined by `fabric` (the inside of `fabric { ... }`).
inline std::string cluster_text(int nodes, const std::string& fabric, const SmallNode& n = {}) {
  std::string f = fabric.empty() ? "" : fmt::format("fabric {{ {} }}\n", fabric);
  return fmt::format("name: \"test\"\nnodes: {}\n{}{}", nodes, node_block(n), f);
}

inline topo::Cluster small_cluster(int nodes, const std::string& fabric, const SmallNode& n = {}) {
  return topo::load_cluster_text(cluster_text(nodes, fabric, n), "test.textproto");
}

}  // namespace moesim::test
