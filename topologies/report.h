// Presenting a cluster: the derived-figures report (table or JSON) and a Graphviz picture.
#pragma once

#include "topologies/cluster.h"
#include "topologies/metrics.h"
#include "topologies/routing.h"
#include "topologies/report.pb.h"

#include <ostream>
#include <string>

namespace moesim::topo {

report::TopologyReport make_report(const Cluster& cluster, const TopologyMetrics& metrics);

std::string report_json(const report::TopologyReport& r);  // pretty, field names as in the proto
void print_report_table(const report::TopologyReport& r, std::ostream& out);

// One route between two devices with up to `max_paths` of its ECMP paths spelled out hop by hop.
report::RouteReport make_route_report(const Cluster& cluster, int src, int dst, int max_paths);
void print_route_table(const report::RouteReport& r, std::ostream& out);

// Graphviz: nodes drawn as boxes of their devices, NICs, PCIe switches and CPUs; one edge per
// physical link, labelled with its bandwidth and coloured by kind.
void write_dot(const Cluster& cluster, std::ostream& out);

}  // namespace moesim::topo
