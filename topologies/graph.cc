#include "topologies/graph.h"

#include "common/error.h"

namespace moesim::topo {

VertexId GraphBuilder::add_vertex(VertexProps props) {
  vertices_.push_back(std::move(props));
  return static_cast<VertexId>(vertices_.size() - 1);
}

void GraphBuilder::add_link(VertexId a, VertexId b, double bandwidth_Bps, double latency_s, hw::LinkKind kind,
                            bool bidirectional, bool half_duplex) {
  MOESIM_ASSERT(a < vertices_.size() && b < vertices_.size() && a != b, "bad link {} -> {}", a, b);
  MOESIM_ASSERT(bandwidth_Bps > 0 && latency_s >= 0, "link {} -> {}: bandwidth {} latency {}", vertices_[a].name,
                vertices_[b].name, bandwidth_Bps, latency_s);
  LinkProps props{bandwidth_Bps, latency_s, kind, link_count_++, half_duplex && bidirectional};
  edges_.emplace_back(a, b);
  edge_props_.push_back(props);
  if (bidirectional) {
    edges_.emplace_back(b, a);
    edge_props_.push_back(props);
  }
}

Graph GraphBuilder::finish() && {
  Graph g(boost::edges_are_unsorted_multi_pass, edges_.begin(), edges_.end(), edge_props_.begin(),
          vertices_.size());
  for (VertexId v = 0; v < vertices_.size(); ++v) g[v] = std::move(vertices_[v]);
  return g;
}

}  // namespace moesim::topo
