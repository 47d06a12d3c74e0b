// Scale-out fabric generators. Each one validates its own message, says how big it will be, and
// adds its switches and links to the cluster graph, attaching every NIC port.
#include "topologies/registry.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <optional>
#include <unordered_map>

namespace moesim::topo {
namespace {

namespace pb = google::protobuf;

constexpr int64_t kMaxSwitches = int64_t{1} << 20;

// Casts the generic message to the generator's own type.
template <typename Msg>
class TypedGenerator : public FabricGenerator {
 public:
  GraphSize size(const pb::Message& spec, const NodeShape& shape) const final {
    return size_of(static_cast<const Msg&>(spec), shape);
  }
  void build(const pb::Message& spec, const NodeShape& shape, const NicPorts& ports, GraphBuilder& b,
             Symmetry& sym) const final {
    build_typed(static_cast<const Msg&>(spec), shape, ports, b, sym);
  }

 protected:
  virtual GraphSize size_of(const Msg& spec, const NodeShape& shape) const = 0;
  virtual void build_typed(const Msg& spec, const NodeShape& shape, const NicPorts& ports, GraphBuilder& b,
                           Symmetry& sym) const = 0;
};

int64_t port_count(const NodeShape& s) { return s.nodes * s.nics_per_node; }

void attach(GraphBuilder& b, const NicPort& nic, VertexId sw) {
  b.add_link(nic.vertex, sw, nic.bandwidth_Bps, nic.latency_s, hw::NETWORK);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
class SingleSwitchGenerator final : public TypedGenerator<hw::SingleSwitch> {
 public:
  void validate(const ConfigScope& scope, const NodeShape&) const override {
    check_latency(scope, "link_latency_s");
  }

 protected:
  GraphSize size_of(const hw::SingleSwitch&, const NodeShape& shape) const override {
    return {1, 2 * port_count(shape)};
  }
  void build_typed(const hw::SingleSwitch&, const NodeShape&, const NicPorts& ports, GraphBuilder& b,
                   Symmetry& sym) const override {
    VertexId sw = b.add_vertex({hw::SWITCH, "switch", -1, -1});
    for (const auto& node : ports)
      for (const NicPort& nic : node) attach(b, nic, sw);
    sym.nodes_equivalent = true;
  }
};

// ---------------------------------------------------------------------------------------------
// Leaf-spine with `leaves` leaves each linked to every spine (no spines when one leaf does);
// link bandwidth from the leaf radix.
//   leaf-spine link bandwidth = ports_per_leaf * port_bandwidth / (oversubscription * spines)
void validate_two_tier(const ConfigScope& scope, const char* per_leaf_field, int64_t per_leaf_limit) {
  scope.in_range(per_leaf_field, 1, static_cast<double>(per_leaf_limit), Need::kRequired);
  scope.in_range("spines", 1, static_cast<double>(kMaxSwitches), Need::kRequired);
  if (scope.has("oversubscription")) {
    double r = scope.number("oversubscription");
    if (!(r >= 1) || !std::isfinite(r))
      scope.error("oversubscription", fmt::format("must be a finite ratio of at least 1 (down:up), got {}", r));
  }
  check_latency(scope, "link_latency_s");
}

std::vector<VertexId> add_spines(GraphBuilder& b, int spines) {
  std::vector<VertexId> out;
  for (int s = 0; s < spines; ++s) out.push_back(b.add_vertex({hw::SWITCH, fmt::format("spine{}", s), -1, -1}));
  return out;
}

void link_leaf_to_spines(GraphBuilder& b, VertexId leaf, const std::vector<VertexId>& spines, double uplink_Bps,
                         double latency_s) {
  for (VertexId s : spines) b.add_link(leaf, s, uplink_Bps, latency_s, hw::NETWORK);
}

class FatTreeGenerator final : public TypedGenerator<hw::FatTree> {
 public:
  void validate(const ConfigScope& scope, const NodeShape&) const override {
    validate_two_tier(scope, "nics_per_leaf", 1 << 16);
  }

 protected:
  GraphSize size_of(const hw::FatTree& f, const NodeShape& shape) const override {
    int64_t leaves = ceil_div(port_count(shape), f.nics_per_leaf());
    return {leaves + f.spines(), 2 * (port_count(shape) + leaves * f.spines())};
  }
  void build_typed(const hw::FatTree& f, const NodeShape& shape, const NicPorts& ports, GraphBuilder& b,
                   Symmetry& sym) const override {
    const int64_t per_leaf = f.nics_per_leaf();
    const int64_t leaves = ceil_div(port_count(shape), per_leaf);
    std::vector<VertexId> spines = leaves > 1 ? add_spines(b, f.spines()) : std::vector<VertexId>{};
    const double uplink = per_leaf * shape.port_bandwidth_Bps / (f.oversubscription() * f.spines());
    std::vector<VertexId> leaf(leaves);
    for (int64_t l = 0; l < leaves; ++l) {
      leaf[l] = b.add_vertex({hw::SWITCH, fmt::format("leaf{}", l), -1, -1});
      link_leaf_to_spines(b, leaf[l], spines, uplink, f.link_latency_s());
    }
    int64_t port = 0;
    for (const auto& node : ports)
      for (const NicPort& nic : node) attach(b, nic, leaf[port++ / per_leaf]);
    // Nodes are interchangeable when every leaf is full and a node's NICs tile leaves evenly.
    const int64_t k = shape.nics_per_node;
    sym.nodes_equivalent = port_count(shape) % per_leaf == 0 && (per_leaf % k == 0 || k % per_leaf == 0);
  }
};

class RailOptimizedGenerator final : public TypedGenerator<hw::RailOptimized> {
 public:
  void validate(const ConfigScope& scope, const NodeShape&) const override {
    validate_two_tier(scope, "nodes_per_group", 1 << 16);
  }

 protected:
  GraphSize size_of(const hw::RailOptimized& f, const NodeShape& shape) const override {
    int64_t leaves = ceil_div(shape.nodes, f.nodes_per_group()) * shape.nics_per_node;
    return {leaves + f.spines(), 2 * (port_count(shape) + leaves * f.spines())};
  }
  void build_typed(const hw::RailOptimized& f, const NodeShape& shape, const NicPorts& ports, GraphBuilder& b,
                   Symmetry& sym) const override {
    const int64_t per_group = f.nodes_per_group();
    const int64_t groups = ceil_div(shape.nodes, per_group);
    const int rails = shape.nics_per_node;
    const bool need_spines = groups * rails > 1;
    std::vector<VertexId> spines = need_spines ? add_spines(b, f.spines()) : std::vector<VertexId>{};
    const double uplink = per_group * shape.port_bandwidth_Bps / (f.oversubscription() * f.spines());
    std::vector<VertexId> leaf(groups * rails);
    for (int64_t g = 0; g < groups; ++g)
      for (int r = 0; r < rails; ++r) {
        VertexId l = b.add_vertex({hw::SWITCH, fmt::format("group{}.rail{}", g, r), -1, -1});
        leaf[g * rails + r] = l;
        link_leaf_to_spines(b, l, spines, uplink, f.link_latency_s());
      }
    for (int64_t n = 0; n < shape.nodes; ++n)
      for (int r = 0; r < rails; ++r) attach(b, ports[n][r], leaf[(n / per_group) * rails + r]);
    sym.nodes_equivalent = shape.nodes % per_group == 0;
  }
};

// ---------------------------------------------------------------------------------------------
class TorusGenerator final : public TypedGenerator<hw::Torus> {
 public:
  void validate(const ConfigScope& scope, const NodeShape& shape) const override {
    const auto& t = static_cast<const hw::Torus&>(scope.message());
    if (t.dims_size() != 2 && t.dims_size() != 3) {
      scope.error("dims", fmt::format("a torus has 2 or 3 dimensions, got {}", t.dims_size()));
    } else {
      int64_t product = 1;
      bool ok = true;
      for (int i = 0; i < t.dims_size(); ++i) {
        if (t.dims(i) < 1 || t.dims(i) > (1 << 20)) {
          scope.error("dims", fmt::format("each dimension must be between 1 and {}, got {}", 1 << 20, t.dims(i)), i);
          ok = false;
        } else {
          product *= t.dims(i);
        }
      }
      if (ok && shape.nodes > 0 && product != shape.nodes)
        scope.error("dims", fmt::format("the dimensions multiply to {} but the cluster has {} nodes", product,
                                        shape.nodes));
    }
    check_bandwidth(scope, "link_bandwidth_Bps", Need::kRequired);
    check_latency(scope, "link_latency_s");
  }

 protected:
  GraphSize size_of(const hw::Torus& t, const NodeShape& shape) const override {
    return {shape.nodes, 2 * (port_count(shape) + shape.nodes * t.dims_size())};
  }
  void build_typed(const hw::Torus& t, const NodeShape& shape, const NicPorts& ports, GraphBuilder& b,
                   Symmetry& sym) const override {
    const int dims = t.dims_size();
    std::vector<VertexId> router(shape.nodes);
    for (int64_t n = 0; n < shape.nodes; ++n) {
      router[n] = b.add_vertex({hw::SWITCH, fmt::format("router{}", n), -1, -1});
      for (const NicPort& nic : ports[n]) attach(b, nic, router[n]);
    }
    // Coordinates: first dimension fastest. stride[d] = product of dims before d.
    std::vector<int64_t> stride(dims, 1);
    for (int d = 1; d < dims; ++d) stride[d] = stride[d - 1] * t.dims(d - 1);
    for (int64_t n = 0; n < shape.nodes; ++n)
      for (int d = 0; d < dims; ++d) {
        const int64_t k = t.dims(d), c = (n / stride[d]) % k;
        if (k == 1 || (k == 2 && c == 1)) continue;  // a ring of two has one link
        const int64_t next = n + (((c + 1) % k) - c) * stride[d];
        b.add_link(router[n], router[next], t.link_bandwidth_bps(), t.link_latency_s(), hw::NETWORK);
      }
    sym.nodes_equivalent = true;
    // Cutting any even dimension in half is a bisection candidate (the smallest cross-section
    // is across the longest dimension).
    for (int d = 0; d < dims; ++d) {
      const int64_t k = t.dims(d);
      if (k < 2 || k % 2 != 0) continue;
      std::vector<uint8_t> node_side(shape.nodes);
      for (int64_t n = 0; n < shape.nodes; ++n) node_side[n] = ((n / stride[d]) % k) >= k / 2;
      sym.node_splits.push_back(std::move(node_side));
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Switches and links written out; NIC ports are named "node<N>.nic<K>".
class ExplicitFabricGenerator final : public TypedGenerator<hw::ExplicitFabric> {
 public:
  void validate(const ConfigScope& scope, const NodeShape& shape) const override {
    const auto& f = static_cast<const hw::ExplicitFabric&>(scope.message());
    std::vector<std::string> names;
    for (int i = 0; i < f.switch__size(); ++i) {
      ConfigScope sw = scope.child("switch", i);
      if (!sw.require("name")) continue;
      if (f.switch_(i).kind() != hw::SWITCH) sw.error("kind", "an explicit fabric declares switches only");
      if (std::find(names.begin(), names.end(), f.switch_(i).name()) != names.end())
        sw.error("name", fmt::format("duplicate vertex name '{}'", f.switch_(i).name()));
      names.push_back(f.switch_(i).name());
    }
    for (int i = 0; i < f.link_size(); ++i) {
      ConfigScope link = scope.child("link", i);
      for (const char* end : {"a", "b"}) {
        if (!link.require(end)) continue;
        const std::string& ref = end[0] == 'a' ? f.link(i).a() : f.link(i).b();
        if (std::find(names.begin(), names.end(), ref) == names.end() && !parse_port(ref, shape))
          link.error(end, fmt::format("'{}' is neither a switch of this fabric nor a NIC port node<N>.nic<K>{}", ref,
                                      shape.nodes > 0 && shape.nics_per_node > 0
                                          ? fmt::format(" (N < {}, K < {})", shape.nodes, shape.nics_per_node)
                                          : ""));
      }
      if (f.link(i).a() == f.link(i).b() && f.link(i).has_a()) link.error("b", "a link cannot join a vertex to itself");
      check_bandwidth(link, "bandwidth_Bps", Need::kRequired);
      check_latency(link, "latency_s");
    }
  }

 protected:
  GraphSize size_of(const hw::ExplicitFabric& f, const NodeShape&) const override {
    return {f.switch__size(), 2 * int64_t{f.link_size()}};
  }
  void build_typed(const hw::ExplicitFabric& f, const NodeShape& shape, const NicPorts& ports, GraphBuilder& b,
                   Symmetry&) const override {
    std::unordered_map<std::string, VertexId> by_name;
    for (const hw::Vertex& v : f.switch_()) by_name[v.name()] = b.add_vertex({hw::SWITCH, v.name(), -1, -1});
    auto resolve = [&](const std::string& ref) {
      if (auto it = by_name.find(ref); it != by_name.end()) return it->second;
      auto [n, k] = *parse_port(ref, shape);
      return ports[n][k].vertex;
    };
    for (const hw::Link& l : f.link())
      b.add_link(resolve(l.a()), resolve(l.b()), l.bandwidth_bps(), l.latency_s(), l.kind(), l.bidirectional());
  }

 private:
  // "node<N>.nic<K>" -> (N, K) when in range.
  static std::optional<std::pair<int64_t, int>> parse_port(const std::string& ref, const NodeShape& shape) {
    long long n = -1;
    int k = -1, consumed = 0;
    if (std::sscanf(ref.c_str(), "node%lld.nic%d%n", &n, &k, &consumed) != 2 ||
        consumed != static_cast<int>(ref.size()))
      return std::nullopt;
    if (n < 0 || k < 0) return std::nullopt;
    if ((shape.nodes >= 0 && n >= shape.nodes) || (shape.nics_per_node >= 0 && k >= shape.nics_per_node))
      return std::nullopt;
    return std::pair<int64_t, int>{n, k};
  }
};

}  // namespace

const Registry<std::unique_ptr<FabricGenerator>>& fabric_generators() {
  static const Registry<std::unique_ptr<FabricGenerator>> registry = [] {
    Registry<std::unique_ptr<FabricGenerator>> r("fabric generator");
    r.add("single_switch", "every NIC on one switch", std::make_unique<SingleSwitchGenerator>());
    r.add("fat_tree", "two-tier leaf-spine fat-tree, NICs fill leaves in order, with an oversubscription ratio",
          std::make_unique<FatTreeGenerator>());
    r.add("rail_optimized", "rail-optimised fat-tree: NIC i of every node in a group on rail switch i, shared spines",
          std::make_unique<RailOptimizedGenerator>());
    r.add("torus", "2-D or 3-D torus of nodes, one router per node, wrap-around links",
          std::make_unique<TorusGenerator>());
    r.add("explicit", "switches and links written out; NIC ports named node<N>.nic<K>",
          std::make_unique<ExplicitFabricGenerator>());
    return r;
  }();
  return registry;
}

}  // namespace moesim::topo
