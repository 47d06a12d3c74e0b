// Figures derived from the cluster graph (never restated from the config):
//
//   scale-up bandwidth of a device  = sum of its outgoing SCALEUP links (NVLink / NVSwitch ports);
//   host bandwidth of a device      = sum of its outgoing PCIE links;
//   scale-out bandwidth of a device = its fair share of what its node can push out of the node
//       when all of the node's devices send at once:
//           min( maxflow(device -> outside its node),  maxflow(node's devices -> outside) / devices )
//       (a NIC shared by two GPUs gives each half; a node without a fabric gives 0);
//   bisection bandwidth = the smallest one-direction max-flow (= min cut) among balanced device
//       splits: ranks [0, N/2) vs the rest, even vs odd nodes, and the generator's own candidates
//       (each even torus dimension cut in half). The exact bisection of an arbitrary graph is
//       NP-hard; for the generated fabrics these splits include the worst case;
//   diameter = the most hops on any device-to-device route (and the longest route latency).
//       Sources examined: every device, or node 0's devices when the generator vouches that all
//       nodes are equivalent (Symmetry::nodes_equivalent).
#pragma once

#include "common/progress.h"
#include "topologies/cluster.h"
#include "topologies/routing.h"

#include <functional>
#include <vector>

namespace moesim::topo {

struct DeviceBandwidth {
  double scaleup_Bps = 0;
  bool scaleup_half_duplex = false;  // its scale-up links' two directions share scaleup_Bps
  double scaleout_Bps = 0;
  double host_Bps = 0;
};

// Routes from one source that look alike, grouped: "7 devices in the same node, 2 hops, ...".
struct RouteClass {
  bool same_node = false;
  int hops = 0;
  double bottleneck_Bps = 0;
  double latency_s = 0;
  uint64_t paths = 0;
  int destinations = 0;
};

struct TopologyMetrics {
  std::vector<DeviceBandwidth> devices;  // by rank
  double bisection_bandwidth_Bps = 0;
  int diameter_hops = 0;
  double max_route_latency_s = 0;
  int sources_examined = 0;
  std::vector<RouteClass> route_classes;  // from device 0
};

struct MetricsOptions {
  bool all_sources = false;  // ignore the symmetry hint and route from every device
  int threads = 0;           // 0: one per hardware thread
  Progress* progress = nullptr;  // told the number of sources, then advanced once per source
};

TopologyMetrics compute_metrics(const Cluster& cluster, const MetricsOptions& options = {});

// Calls fn(src, routes_from(src)) for each source, spread over `threads` threads (0: all cores).
// fn may run concurrently for different sources.
void for_each_source(const Router& router, const std::vector<int>& sources, int threads,
                     const std::function<void(int, const std::vector<RouteSummary>&)>& fn);

// Max-flow (one direction) from the devices with side[rank] == 0 to those with side 1.
double cut_bandwidth(const Cluster& cluster, const std::vector<uint8_t>& side);

std::vector<RouteClass> route_classes(const Cluster& cluster, int src, const std::vector<RouteSummary>& routes);

}  // namespace moesim::topo
