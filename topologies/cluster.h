// A cluster: a validated hardware description built into a graph.
//
//   topo::Cluster c = topo::load_cluster("configs/hardware/h800-2048.textproto");
//   c.device_count();            // 2048
//   c.graph()[c.device(5).vertex].name;   // "node0.gpu5"
//
// Loading validates the whole config first and throws one ConfigError listing every problem
// (FILE:LINE: field.path: message); nothing is built from a config with errors.
#pragma once

#include "topologies/graph.h"
#include "topologies/hardware.pb.h"

#include <string>
#include <string_view>
#include <vector>

namespace moesim::topo {

// Refuse configs whose graph would exceed these before building anything.
inline constexpr int64_t kMaxDevices = int64_t{1} << 20;
inline constexpr int64_t kMaxVertices = int64_t{1} << 23;
inline constexpr int64_t kMaxEdges = int64_t{1} << 26;

struct Device {
  VertexId vertex = 0;
  int node = -1;         // -1 for an explicit-graph device outside any node
  int local_index = 0;   // index within its node
  int type = 0;          // index into Cluster::device_types()
};

// What a generator knows about its own symmetry, so that derived figures need not look at every
// source. Tests check each hint against the brute-force answer on small instances.
struct Symmetry {
  // Every node can be mapped onto every other by a graph automorphism: routes from node 0's
  // devices are representative of all sources.
  bool nodes_equivalent = false;
  // Extra balanced splits of the nodes (per node: side 0 or 1) worth trying for the bisection.
  std::vector<std::vector<uint8_t>> node_splits;
};

// The collectives a cluster's collective_efficiency may name (costmodel/collectives.h's names).
inline constexpr std::string_view kCollectiveOpNames[] = {"all_reduce", "all_gather", "reduce_scatter",
                                                           "all_to_all", "send_recv",  "broadcast"};

class Cluster {
 public:
  Cluster(hw::Cluster spec, std::string source, Graph graph, int link_count, std::vector<Device> devices,
          std::vector<hw::DeviceType> device_types, int node_count, Symmetry symmetry);

  const hw::Cluster& spec() const { return spec_; }  // with presets resolved
  const std::string& source() const { return source_; }
  const std::string& name() const { return spec_.name(); }
  const Graph& graph() const { return graph_; }

  int device_count() const { return static_cast<int>(devices_.size()); }
  int node_count() const { return node_count_; }
  int link_count() const { return link_count_; }   // physical links (a duplex link counts once)
  int directed_link_count() const { return static_cast<int>(boost::num_edges(graph_)); }
  int vertex_count() const { return static_cast<int>(boost::num_vertices(graph_)); }

  const Device& device(int rank) const { return devices_.at(rank); }
  const std::vector<Device>& devices() const { return devices_; }
  const std::vector<hw::DeviceType>& device_types() const { return device_types_; }
  const hw::DeviceType& device_type(int rank) const { return device_types_[devices_.at(rank).type]; }
  const Symmetry& symmetry() const { return symmetry_; }
  // The fabric generator's registered name, "explicit-graph", or "none" for a lone node.
  std::string fabric_kind() const;
  // The collective library's bandwidth efficiency for `op` (hardware.proto); 1 when not given.
  double collective_efficiency(std::string_view op) const;
  // The collective library's seconds per call of `op` beyond the links' (hardware.proto); 0 when
  // not given.
  double collective_latency_s(std::string_view op) const;
  // What the collective library's rendezvous adds to a message of `message_bytes` within a node
  // or between nodes (hardware.proto Rendezvous): 0 up to the eager limit or without one.
  double rendezvous_s(bool between_nodes, double message_bytes) const;

 private:
  const hw::CollectiveEfficiency* collective_entry(std::string_view op) const;  // null: not given

  hw::Cluster spec_;
  std::string source_;
  Graph graph_;
  int link_count_;
  std::vector<Device> devices_;
  std::vector<hw::DeviceType> device_types_;
  int node_count_;
  Symmetry symmetry_;
};

// Parses, validates and builds. Throws ConfigError with every problem found.
Cluster load_cluster(const std::string& path);
Cluster load_cluster_text(const std::string& text, const std::string& name);

}  // namespace moesim::topo
