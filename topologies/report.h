// Presenting a cluster: the derived-figures report (table or JSON) and a Graphviz picture.
#pragma once

#include "topologies/cluster.h"
#include "topologies/metrics.h"
#include "topologies/report.pb.h"

#include <ostream>
#include <string>

namespace moesim::topo {

report::TopologyReport make_report(const Cluster& cluster, const TopologyMetrics& metrics);

std::string report_json(const report::TopologyReport& r);  // pretty, field names as in the proto
void print_report_table(const report::TopologyReport& r, std::ostream& out);

// Graphviz: nodes drawn as boxes of their devices, NICs, PCIe switches and CPUs; one edge per
// physical link, labelled with its bandwidth and coloured by kind.
void write_dot(const Cluster& cluster, std::ostream& out);

}  // namespace moesim::topo
