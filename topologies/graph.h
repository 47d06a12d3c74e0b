// The cluster graph (Boost.Graph): vertices are devices, NICs, switches and hosts (CPU sockets
// with their memory); edges are directed links with a bandwidth (bytes/s) and a latency (s).
// A full-duplex link is two edges that share a link_id.
#pragma once

#include "topologies/hardware.pb.h"

#include <boost/graph/compressed_sparse_row_graph.hpp>
#include <boost/range/iterator_range.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace moesim::topo {

struct VertexProps {
  hw::VertexKind kind = hw::SWITCH;
  std::string name;   // unique, e.g. "node3.gpu5", "leaf12", "spine0"
  int node = -1;      // node index for vertices inside a node; -1 for fabric vertices
  int device = -1;    // device rank for DEVICE vertices
};

struct LinkProps {
  double bandwidth_Bps = 0;
  double latency_s = 0;
  hw::LinkKind kind = hw::NETWORK;
  int link_id = -1;  // the physical link this direction belongs to
  bool half_duplex = false;  // its two directions share bandwidth_Bps (the flows load both)
};

using Graph = boost::compressed_sparse_row_graph<boost::bidirectionalS, VertexProps, LinkProps, boost::no_property,
                                                 uint32_t, uint32_t>;
using VertexId = boost::graph_traits<Graph>::vertex_descriptor;
using EdgeId = boost::graph_traits<Graph>::edge_descriptor;

// Collects vertices and links, then freezes them into a compressed-sparse-row Graph.
class GraphBuilder {
 public:
  VertexId add_vertex(VertexProps props);
  // One physical link: two directed edges when bidirectional, one otherwise; a half-duplex one's
  // two directions share its bandwidth.
  void add_link(VertexId a, VertexId b, double bandwidth_Bps, double latency_s, hw::LinkKind kind,
                bool bidirectional = true, bool half_duplex = false);

  int link_count() const { return link_count_; }

  Graph finish() &&;

 private:
  std::vector<VertexProps> vertices_;
  std::vector<std::pair<VertexId, VertexId>> edges_;
  std::vector<LinkProps> edge_props_;
  int link_count_ = 0;
};

}  // namespace moesim::topo
