// Routing between devices over the cluster graph.
//
// Route choice: shortest path under a link cost that stands for the time to move a reference
// message over one link,
//     cost(link) = latency_s + kRouteReferenceBytes / bandwidth_Bps,
// so a route prefers fast links and few hops (an NVSwitch hop beats two PCIe hops). Paths whose
// cost equals the best within the precision policy (common/precision.h) form the route's ECMP set,
// e.g. one path per spine between two leaves of a fat-tree.
//
// Transit rules: a route never passes through a device other than its source (GPUs do not
// forward), and once it enters another node it stays there (no hairpins through third nodes).
//
// Per route: hop list(s), bottleneck bandwidth (the narrowest link of the best ECMP path), latency
// (sum of link latencies), hop count and the number of ECMP paths.
#pragma once

#include "topologies/cluster.h"

#include <cstdint>
#include <limits>
#include <vector>

namespace moesim::topo {

inline constexpr double kRouteReferenceBytes = 1 << 20;  // 1 MiB

struct RouteSummary {
  double bottleneck_Bps = 0;  // max over ECMP paths of the path's narrowest link; +inf to itself
  double latency_s = 0;       // smallest sum of link latencies among ECMP paths
  int hops = 0;               // fewest links among ECMP paths
  uint64_t paths = 0;         // ECMP path count (saturates at UINT64_MAX); 0 = unreachable
  bool reachable() const { return paths > 0; }
};

struct Route : RouteSummary {
  // Up to the requested number of ECMP paths, each a vertex list from source to destination.
  std::vector<std::vector<VertexId>> path_list;
};

class Router {
 public:
  explicit Router(const Cluster& cluster);

  // Routes from device `src` to every device, indexed by destination rank. Thread-safe.
  std::vector<RouteSummary> routes_from(int src) const;
  // One route with up to `max_paths` of its ECMP paths spelled out.
  Route route(int src, int dst, int max_paths = 16) const;

 private:
  struct Search {
    std::vector<double> dist;
    std::vector<uint64_t> paths;
    std::vector<double> bottleneck;
    std::vector<double> latency;
    std::vector<int> hops;
  };
  Search search(VertexId src) const;
  bool blocked(EdgeId e, VertexId src) const;

  const Cluster& cluster_;
  std::vector<double> cost_;  // by edge index
};

}  // namespace moesim::topo
