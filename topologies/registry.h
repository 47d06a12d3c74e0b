// Registries of the pluggable parts of a hardware description (`moesim list` shows them):
//   - fabric generators: one per case of hw::Fabric, registered under that case's field name;
//   - device presets: datasheet device types a config can start from (`device { preset: "h100-sxm5" }`).
#pragma once

#include "common/config.h"
#include "common/registry.h"
#include "topologies/cluster.h"
#include "topologies/graph.h"
#include "topologies/hardware.pb.h"

#include <memory>

namespace moesim::topo {

// Physical quantities in configs, checked against bounds no real hardware comes near (they keep
// arithmetic such as integer max-flow capacities exact and overflow-free).
inline constexpr double kMaxBandwidth_Bps = 1e15;  // 1 PB/s per link direction
inline constexpr double kMaxLatency_s = 1;
inline constexpr double kMaxBytes = 1e15;
inline constexpr double kMaxFlops = 1e18;  // per device

inline bool check_bandwidth(const ConfigScope& s, std::string_view field, Need need) {
  return s.positive(field, need, /*allow_zero=*/false, kMaxBandwidth_Bps);
}
inline bool check_latency(const ConfigScope& s, std::string_view field) {
  return s.positive(field, Need::kOptional, /*allow_zero=*/true, kMaxLatency_s);
}

// What a fabric generator needs to know about the nodes it joins.
// While validating, a figure that could not be trusted (its own part of the config is broken) is -1.
struct NodeShape {
  int64_t nodes = 0;
  int nics_per_node = 0;
  double port_bandwidth_Bps = 0;  // the fastest NIC: the speed of a switch port
};

struct GraphSize {
  int64_t vertices = 0;
  int64_t edges = 0;  // directed
};

// A NIC, ready to be cabled to a switch: the cable gets the NIC's bandwidth and latency.
struct NicPort {
  VertexId vertex = 0;
  double bandwidth_Bps = 0;
  double latency_s = 0;
};
// NIC ports by [node][nic index within the node].
using NicPorts = std::vector<std::vector<NicPort>>;

class FabricGenerator {
 public:
  virtual ~FabricGenerator() = default;
  // Records every problem with the generator's own message (scope points at it).
  virtual void validate(const ConfigScope& scope, const NodeShape& shape) const = 0;
  // Size of what build() adds; called only on a message that validated.
  virtual GraphSize size(const google::protobuf::Message& spec, const NodeShape& shape) const = 0;
  // Adds the fabric's switches and links, attaching every NIC port.
  virtual void build(const google::protobuf::Message& spec, const NodeShape& shape, const NicPorts& ports,
                     GraphBuilder& builder, Symmetry& symmetry) const = 0;
};

const Registry<std::unique_ptr<FabricGenerator>>& fabric_generators();
const Registry<hw::DeviceType>& device_presets();

// A DeviceType with `preset` becomes the registered type with the written fields on top; an
// unknown preset is reported on the scope (listing the registered ones).
void resolve_device_preset(hw::DeviceType* d, const ConfigScope& scope);
// Records every problem of a (resolved) DeviceType: name, at least one peak, memory bandwidth,
// memory size (required or not), launch overhead.
void validate_device_type(const ConfigScope& s, Need memory);

}  // namespace moesim::topo
