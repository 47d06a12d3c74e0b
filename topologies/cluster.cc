#include "topologies/cluster.h"

#include "common/config.h"
#include "topologies/registry.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <google/protobuf/descriptor.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <set>
#include <unordered_map>
#include <unordered_set>

namespace moesim::topo {
namespace {

namespace pb = google::protobuf;

constexpr int kMaxDevicesPerNode = 1024;
constexpr int kMaxNicsPerNode = 256;
constexpr int kMaxPcieSwitches = 256;
constexpr int kMaxSockets = 16;

// ---------------------------------------------------------------------------------------------
// Presets and validation.

void resolve_presets(hw::Cluster* c, const ConfigScope& root) {
  if (c->has_node() && c->node().has_device())
    resolve_device_preset(c->mutable_node()->mutable_device(), root.child("node").child("device"));
  for (int i = 0; i < c->device_type_size(); ++i) resolve_device_preset(c->mutable_device_type(i), root.child("device_type", i));
}

// ---------------------------------------------------------------------------------------------
// Validation: record every problem, never stop at the first.

// Returns NICs per node (0 when the node is too broken to tell).
int validate_node(const ConfigScope& s) {
  const auto& node = static_cast<const hw::NodeTemplate&>(s.message());
  if (s.require("device") && !node.device().has_preset()) validate_device_type(s.child("device"), Need::kRequired);  // else: unknown preset
  const bool devices_ok = s.in_range("devices_per_node", 1, kMaxDevicesPerNode, Need::kRequired);
  const int devices = devices_ok ? node.devices_per_node() : 0;

  if (!s.has("intra_fabric") || node.intra_fabric() == hw::INTRA_NODE_FABRIC_UNSPECIFIED) {
    s.error("intra_fabric", "missing required value: NVSWITCH, NVLINK_MESH or PCIE_TREE");
  } else if (node.intra_fabric() == hw::PCIE_TREE) {
    if (s.has("scaleup_bandwidth_Bps"))
      s.error("scaleup_bandwidth_Bps", "a PCIE_TREE node has no scale-up links; remove this or use NVSWITCH / NVLINK_MESH");
  } else {
    check_bandwidth(s, "scaleup_bandwidth_Bps", Need::kRequired);
  }
  check_latency(s, "scaleup_latency_s");

  if (s.require("pcie")) {
    ConfigScope p = s.child("pcie");
    p.in_range("switches", 1, kMaxPcieSwitches, Need::kOptional);
    check_bandwidth(p, "device_bandwidth_Bps", Need::kRequired);
    check_bandwidth(p, "uplink_bandwidth_Bps", Need::kOptional);
    check_latency(p, "latency_s");
  }

  int64_t nics = 0;
  for (int i = 0; i < node.nic_size(); ++i) {
    ConfigScope n = s.child("nic", i);
    const hw::Nic& nic = node.nic(i);
    if (n.in_range("count", 1, kMaxNicsPerNode, Need::kOptional) || !n.has("count")) nics += nic.count();
    check_bandwidth(n, "bandwidth_Bps", Need::kRequired);
    check_latency(n, "latency_s");
    if (nic.devices_size() > 0 && nic.count() != 1)
      n.error("devices", "a PCIe affinity list describes one NIC: set count to 1 or drop devices");
    std::unordered_set<int> seen;
    for (int j = 0; j < nic.devices_size(); ++j) {
      int d = nic.devices(j);
      if (devices_ok && (d < 0 || d >= devices))
        n.error("devices", fmt::format("device {} is not in this node (0..{})", d, devices - 1), j);
      else if (!seen.insert(d).second)
        n.error("devices", fmt::format("device {} listed twice", d), j);
    }
  }
  if (nics > kMaxNicsPerNode) s.error("nic", fmt::format("{} NICs per node; at most {}", nics, kMaxNicsPerNode));

  s.positive("host_memory_bytes", Need::kOptional, /*allow_zero=*/true, kMaxBytes);
  if (s.in_range("cpu_sockets", 1, kMaxSockets, Need::kOptional) && node.cpu_sockets() > 1)
    check_bandwidth(s, "socket_bandwidth_Bps", Need::kRequired);
  check_latency(s, "socket_latency_s");
  return nics > kMaxNicsPerNode ? 0 : static_cast<int>(nics);
}

int pcie_switches(const hw::NodeTemplate& n) { return n.pcie().has_switches() ? n.pcie().switches() : n.devices_per_node(); }

GraphSize node_size(const hw::NodeTemplate& n, int nics) {
  const int64_t d = n.devices_per_node(), p = pcie_switches(n), s = n.cpu_sockets();
  GraphSize g;
  g.vertices = d + nics + p + s + (n.intra_fabric() == hw::NVSWITCH ? 1 : 0);
  g.edges = 2 * (d + nics + p + s * (s - 1) / 2);
  if (n.intra_fabric() == hw::NVSWITCH) g.edges += 2 * d;
  if (n.intra_fabric() == hw::NVLINK_MESH) g.edges += d * (d - 1);
  return g;
}

const pb::FieldDescriptor* fabric_case(const hw::Fabric& f) {
  return f.GetReflection()->GetOneofFieldDescriptor(f, hw::Fabric::descriptor()->FindOneofByName("kind"));
}

NodeShape node_shape(const hw::Cluster& c, int nics) {
  NodeShape shape{c.nodes(), nics, 0};
  for (const hw::Nic& n : c.node().nic()) shape.port_bandwidth_Bps = std::max(shape.port_bandwidth_Bps, n.bandwidth_bps());
  return shape;
}

void validate_template_cluster(const ConfigScope& root, const hw::Cluster& c) {
  int nics = 0;
  bool node_ok = false;
  if (root.require("node")) {
    const size_t before = root.problem_count();
    nics = validate_node(root.child("node"));
    // The node's shape can be trusted below (an unresolved preset was reported already).
    node_ok = root.problem_count() == before && !c.node().device().has_preset();
  }
  const bool nodes_ok = root.in_range("nodes", 1, static_cast<double>(kMaxDevices), Need::kRequired);
  root.positive("price_per_device_hour", Need::kOptional);

  const pb::FieldDescriptor* fcase = c.has_fabric() ? fabric_case(c.fabric()) : nullptr;
  const FabricGenerator* gen = nullptr;
  if (c.has_fabric() && fcase == nullptr) {
    root.error("fabric", fmt::format("choose one fabric: {}", fabric_generators().names()));
  } else if (fcase != nullptr) {
    gen = fabric_generators().find(fcase->name())->get();
    if (c.has_node() && nics == 0 && node_ok)
      root.child("node").error("nic", "the fabric needs at least one NIC per node to attach to");
  } else if (nodes_ok && c.nodes() > 1) {
    root.error("fabric", fmt::format("missing required value: {} nodes need a fabric ({})", c.nodes(),
                                     fabric_generators().names()));
  }

  // The fabric is checked even when the node is not: what it cannot know is marked unknown (-1).
  NodeShape shape = node_ok ? node_shape(c, nics) : NodeShape{};
  shape.nodes = nodes_ok ? c.nodes() : -1;
  if (!node_ok) shape.nics_per_node = -1;
  bool fabric_ok = true;
  if (gen != nullptr) {
    const size_t before = root.problem_count();
    gen->validate(root.child("fabric").child(fcase->name()), shape);
    fabric_ok = root.problem_count() == before;
  }
  if (!node_ok || !nodes_ok || !fabric_ok) return;  // the size below needs all three sound

  // Refuse absurd sizes before anything is allocated.
  GraphSize per_node = node_size(c.node(), nics);
  GraphSize fabric = gen ? gen->size(c.fabric().GetReflection()->GetMessage(c.fabric(), fcase), shape) : GraphSize{};
  const double devices = double(c.nodes()) * c.node().devices_per_node();
  const double vertices = double(c.nodes()) * per_node.vertices + fabric.vertices;
  const double edges = double(c.nodes()) * per_node.edges + fabric.edges;
  if (devices > kMaxDevices || vertices > kMaxVertices || edges > kMaxEdges)
    root.error("nodes", fmt::format("the cluster would have {:.0f} devices, {:.0f} vertices and {:.0f} directed links; "
                                    "the limits are {}, {} and {}",
                                    devices, vertices, edges, kMaxDevices, kMaxVertices, kMaxEdges));
}

// Resolves a device_type reference of an explicit graph: the cluster's own types first, then presets.
std::optional<hw::DeviceType> find_device_type(const hw::Cluster& c, const std::string& name) {
  for (const hw::DeviceType& d : c.device_type())
    if (d.name() == name) return d;
  if (const hw::DeviceType* p = device_presets().find(name)) return *p;
  return std::nullopt;
}

void validate_graph_cluster(const ConfigScope& root, const hw::Cluster& c) {
  std::unordered_set<std::string> type_names;
  for (int i = 0; i < c.device_type_size(); ++i) {
    ConfigScope t = root.child("device_type", i);
    if (!c.device_type(i).has_preset()) validate_device_type(t, Need::kRequired);  // else: unknown preset, reported
    if (c.device_type(i).has_name() && !type_names.insert(c.device_type(i).name()).second)
      t.error("name", fmt::format("duplicate device type '{}'", c.device_type(i).name()));
  }
  ConfigScope g = root.child("graph");
  const hw::ExplicitGraph& graph = c.graph();
  if (graph.vertex_size() > kMaxVertices) g.error("vertex", fmt::format("more than {} vertices", kMaxVertices));
  std::unordered_set<std::string> names;
  int devices = 0;
  for (int i = 0; i < graph.vertex_size(); ++i) {
    ConfigScope v = g.child("vertex", i);
    const hw::Vertex& vx = graph.vertex(i);
    if (v.require("name") && !names.insert(vx.name()).second)
      v.error("name", fmt::format("duplicate vertex name '{}'", vx.name()));
    if (vx.kind() == hw::VERTEX_KIND_UNSPECIFIED) v.error("kind", "set DEVICE, NIC, SWITCH or HOST");
    if (vx.kind() == hw::DEVICE) {
      ++devices;
      if (v.require("device_type") && !find_device_type(c, vx.device_type()))
        v.error("device_type", fmt::format("unknown device type '{}': not in this file's device_type list nor a "
                                           "registered preset ({})", vx.device_type(), device_presets().names()));
    } else if (vx.has_device_type()) {
      v.error("device_type", "only DEVICE vertices have a device type");
    }
    v.in_range("node", 0, static_cast<double>(kMaxDevices), Need::kOptional);
  }
  if (devices == 0) g.error("vertex", "the graph has no DEVICE vertex");
  if (graph.link_size() > kMaxEdges / 2) g.error("link", fmt::format("more than {} links", kMaxEdges / 2));
  for (int i = 0; i < graph.link_size(); ++i) {
    ConfigScope l = g.child("link", i);
    const hw::Link& link = graph.link(i);
    for (const char* end : {"a", "b"}) {
      const std::string& ref = end[0] == 'a' ? link.a() : link.b();
      if (l.require(end) && !names.count(ref)) l.error(end, fmt::format("no vertex named '{}' in this graph", ref));
    }
    if (link.has_a() && link.a() == link.b()) l.error("b", "a link cannot join a vertex to itself");
    check_bandwidth(l, "bandwidth_Bps", Need::kRequired);
    check_latency(l, "latency_s");
    if (link.kind() == hw::LINK_KIND_UNSPECIFIED) l.error("kind", "set SCALEUP, PCIE, NETWORK or SOCKET");
  }
}

void validate(const ConfigScope& root, const hw::Cluster& c) {
  root.require("name");
  std::set<std::string> ops;
  for (int i = 0; i < c.collective_efficiency_size(); ++i) {
    const ConfigScope e = root.child("collective_efficiency", i);
    e.positive("bandwidth_efficiency", Need::kRequired, /*allow_zero=*/false, 10.0);
    e.positive("latency_s", Need::kOptional, /*allow_zero=*/true, 1.0);
    const std::string& op = c.collective_efficiency(i).op();
    if (std::find(std::begin(kCollectiveOpNames), std::end(kCollectiveOpNames), op) == std::end(kCollectiveOpNames))
      e.error("op", fmt::format("'{}' is not a collective: choose {}", op, fmt::join(kCollectiveOpNames, ", ")));
    else if (!ops.insert(op).second)
      e.error("op", fmt::format("{} has an efficiency already", op));
  }
  for (const char* field : {"rendezvous", "network_rendezvous"}) {
    if (!root.has(field)) continue;
    const ConfigScope r = root.child(field);
    r.positive("eager_limit_bytes", Need::kRequired, /*allow_zero=*/false, kMaxBytes);
    r.positive("latency_s", Need::kRequired, /*allow_zero=*/true, kMaxLatency_s);
  }
  const bool templated = c.has_node() || c.has_nodes() || c.has_fabric();
  if (c.has_graph() && templated) {
    root.error("graph", "describe the cluster either as node + nodes + fabric or as an explicit graph, not both");
  } else if (c.has_graph()) {
    validate_graph_cluster(root, c);
  } else {
    validate_template_cluster(root, c);
  }
}

// ---------------------------------------------------------------------------------------------
// Building.

struct Built {
  GraphBuilder builder;
  std::vector<Device> devices;
  std::vector<hw::DeviceType> types;
  int node_count = 0;
  Symmetry symmetry;
};

// Adds one node's devices, PCIe tree, CPU sockets, scale-up fabric and NICs; returns its NIC ports.
std::vector<NicPort> build_node(const hw::NodeTemplate& t, int n, Built& out) {
  GraphBuilder& b = out.builder;
  const int d_count = t.devices_per_node(), sockets = t.cpu_sockets(), switches = pcie_switches(t);
  const hw::Pcie& pcie = t.pcie();
  const double uplink = pcie.has_uplink_bandwidth_bps() ? pcie.uplink_bandwidth_bps() : pcie.device_bandwidth_bps();

  std::vector<VertexId> cpu(sockets), sw(switches), dev(d_count);
  for (int s = 0; s < sockets; ++s) cpu[s] = b.add_vertex({hw::HOST, fmt::format("node{}.cpu{}", n, s), n, -1});
  for (int s = 0; s < sockets; ++s)
    for (int r = s + 1; r < sockets; ++r) b.add_link(cpu[s], cpu[r], t.socket_bandwidth_bps(), t.socket_latency_s(), hw::SOCKET);
  for (int p = 0; p < switches; ++p) {
    sw[p] = b.add_vertex({hw::SWITCH, fmt::format("node{}.pcie{}", n, p), n, -1});
    b.add_link(sw[p], cpu[int64_t{p} * sockets / switches], uplink, pcie.latency_s(), hw::PCIE);
  }
  auto switch_of = [&](int d) { return sw[int64_t{d} * switches / d_count]; };
  for (int d = 0; d < d_count; ++d) {
    const int rank = static_cast<int>(out.devices.size());
    dev[d] = b.add_vertex({hw::DEVICE, fmt::format("node{}.gpu{}", n, d), n, rank});
    out.devices.push_back(Device{dev[d], n, d, 0});
    b.add_link(dev[d], switch_of(d), pcie.device_bandwidth_bps(), pcie.latency_s(), hw::PCIE);
  }
  if (t.intra_fabric() == hw::NVSWITCH) {
    VertexId nvs = b.add_vertex({hw::SWITCH, fmt::format("node{}.nvswitch", n), n, -1});
    for (VertexId v : dev)
      b.add_link(v, nvs, t.scaleup_bandwidth_bps(), t.scaleup_latency_s() / 2, hw::SCALEUP, true, t.scaleup_half_duplex());
  } else if (t.intra_fabric() == hw::NVLINK_MESH && d_count > 1) {
    const double per_peer = t.scaleup_bandwidth_bps() / (d_count - 1);
    for (int i = 0; i < d_count; ++i)
      for (int j = i + 1; j < d_count; ++j)
        b.add_link(dev[i], dev[j], per_peer, t.scaleup_latency_s(), hw::SCALEUP, true, t.scaleup_half_duplex());
  }
  std::vector<NicPort> ports;
  for (const hw::Nic& nic : t.nic()) {
    for (int k = 0; k < nic.count(); ++k) {
      const int index = static_cast<int>(ports.size());
      VertexId v = b.add_vertex({hw::NIC, fmt::format("node{}.nic{}", n, index), n, -1});
      // A NIC sits on the PCIe switch of the first device that uses it.
      const int first = nic.devices_size() > 0 ? nic.devices(0) : static_cast<int>(int64_t{k} * d_count / nic.count());
      b.add_link(v, switch_of(first), pcie.device_bandwidth_bps(), pcie.latency_s(), hw::PCIE);
      ports.push_back(NicPort{v, nic.bandwidth_bps(), nic.latency_s()});
    }
  }
  return ports;
}

Built build_template(const hw::Cluster& c) {
  Built out;
  out.types.push_back(c.node().device());
  out.node_count = c.nodes();
  NicPorts ports(c.nodes());
  for (int n = 0; n < c.nodes(); ++n) ports[n] = build_node(c.node(), n, out);
  if (c.has_fabric()) {
    const pb::FieldDescriptor* fcase = fabric_case(c.fabric());
    const FabricGenerator& gen = **fabric_generators().find(fcase->name());
    gen.build(c.fabric().GetReflection()->GetMessage(c.fabric(), fcase), node_shape(c, static_cast<int>(ports[0].size())),
              ports, out.builder, out.symmetry);
  } else {
    out.symmetry.nodes_equivalent = true;  // a single node
  }
  return out;
}

Built build_graph(const hw::Cluster& c) {
  Built out;
  std::unordered_map<std::string, VertexId> by_name;
  std::unordered_map<std::string, int> type_index;
  std::unordered_map<int, int> node_ids;
  for (const hw::Vertex& v : c.graph().vertex()) {
    int node = v.has_node() ? v.node() : -1;
    if (node >= 0) node_ids.emplace(node, static_cast<int>(node_ids.size()));
    int rank = v.kind() == hw::DEVICE ? static_cast<int>(out.devices.size()) : -1;
    VertexId id = out.builder.add_vertex({v.kind(), v.name(), node, rank});
    by_name[v.name()] = id;
    if (v.kind() != hw::DEVICE) continue;
    auto [it, fresh] = type_index.emplace(v.device_type(), static_cast<int>(out.types.size()));
    if (fresh) out.types.push_back(*find_device_type(c, v.device_type()));
    out.devices.push_back(Device{id, node, 0, it->second});
  }
  // Devices outside any node count as nodes of their own.
  std::unordered_map<int, int> local;
  int loners = 0;
  for (Device& d : out.devices) {
    if (d.node >= 0) d.local_index = local[d.node]++;
    else ++loners;
  }
  out.node_count = static_cast<int>(node_ids.size()) + loners;
  for (const hw::Link& l : c.graph().link())
    out.builder.add_link(by_name.at(l.a()), by_name.at(l.b()), l.bandwidth_bps(), l.latency_s(), l.kind(), l.bidirectional());
  return out;
}

// Vertices reachable from `from` (forwards or backwards), never passing through another device.
std::vector<uint8_t> reach(const Graph& g, VertexId from, bool backwards) {
  std::vector<uint8_t> seen(boost::num_vertices(g), 0);
  std::deque<VertexId> queue{from};
  seen[from] = 1;
  auto visit = [&](VertexId v) {
    if (!seen[v]) {
      seen[v] = 1;
      if (g[v].kind != hw::DEVICE) queue.push_back(v);
    }
  };
  while (!queue.empty()) {
    VertexId u = queue.front();
    queue.pop_front();
    if (backwards) {
      for (auto e : boost::make_iterator_range(boost::in_edges(u, g))) visit(boost::source(e, g));
    } else {
      for (auto e : boost::make_iterator_range(boost::out_edges(u, g))) visit(boost::target(e, g));
    }
  }
  return seen;
}

void check_connected(const ConfigScope& root, const hw::Cluster& c, const Graph& g, const std::vector<Device>& devices) {
  const VertexId first = devices.front().vertex;
  std::vector<uint8_t> fwd = reach(g, first, false), bwd = reach(g, first, true);
  for (const Device& d : devices) {
    if (fwd[d.vertex] && bwd[d.vertex]) continue;
    const char* field = c.has_graph() ? "graph" : (c.has_fabric() ? "fabric" : "nodes");
    root.error(field, fmt::format("the cluster is disconnected: {} and {} cannot reach each other", g[first].name,
                                  g[d.vertex].name));
    return;
  }
}

Cluster load(hw::Cluster spec, const ConfigDocument& doc) {
  Diagnostics diags;
  ConfigScope parsed = doc.root(&diags);
  resolve_presets(&spec, parsed);
  ConfigScope root = doc.root_for(spec, &diags);
  validate(root, spec);
  diags.throw_if_any();

  Built built = spec.has_graph() ? build_graph(spec) : build_template(spec);
  const int links = built.builder.link_count();
  Graph graph = std::move(built.builder).finish();
  check_connected(root, spec, graph, built.devices);
  diags.throw_if_any();
  return Cluster(std::move(spec), doc.file(), std::move(graph), links, std::move(built.devices), std::move(built.types),
                 built.node_count, std::move(built.symmetry));
}

}  // namespace

Cluster::Cluster(hw::Cluster spec, std::string source, Graph graph, int link_count, std::vector<Device> devices,
                 std::vector<hw::DeviceType> device_types, int node_count, Symmetry symmetry)
    : spec_(std::move(spec)),
      source_(std::move(source)),
      graph_(std::move(graph)),
      link_count_(link_count),
      devices_(std::move(devices)),
      device_types_(std::move(device_types)),
      node_count_(node_count),
      symmetry_(std::move(symmetry)) {}

const hw::CollectiveEfficiency* Cluster::collective_entry(std::string_view op) const {
  for (const hw::CollectiveEfficiency& e : spec_.collective_efficiency())
    if (e.op() == op) return &e;
  return nullptr;
}

double Cluster::collective_efficiency(std::string_view op) const {
  const hw::CollectiveEfficiency* e = collective_entry(op);
  return e ? e->bandwidth_efficiency() : 1.0;
}

double Cluster::collective_latency_s(std::string_view op) const {
  const hw::CollectiveEfficiency* e = collective_entry(op);
  return e ? e->latency_s() : 0.0;
}

double Cluster::rendezvous_s(bool between_nodes, double message_bytes) const {
  const hw::Rendezvous& r = between_nodes ? spec_.network_rendezvous() : spec_.rendezvous();
  return r.has_eager_limit_bytes() && message_bytes > r.eager_limit_bytes() ? r.latency_s() : 0;
}

std::string Cluster::fabric_kind() const {
  if (spec_.has_graph()) return "explicit-graph";
  if (!spec_.has_fabric()) return "none";
  return fabric_case(spec_.fabric())->name();
}

Cluster load_cluster(const std::string& path) {
  hw::Cluster spec;
  ConfigDocument doc = ConfigDocument::parse_file(path, &spec);
  return load(spec, doc);
}

Cluster load_cluster_text(const std::string& text, const std::string& name) {
  hw::Cluster spec;
  ConfigDocument doc = ConfigDocument::parse_text(text, name, &spec);
  return load(spec, doc);
}

}  // namespace moesim::topo
