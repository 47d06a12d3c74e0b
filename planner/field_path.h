// Setting one field of a protobuf message by its dotted path, through reflection (what a sweep's
// axes do to the base scenario's configs):
//
//   hw::Cluster c = ...;
//   planner::set_field(&c, "node.scaleup_bandwidth_Bps", planner::FieldValue::of(300e9));
//   planner::set_field(&strategy, "all_to_all", planner::FieldValue::of("HIERARCHICAL"));
//   planner::set_field(&c, "node.nic[0].bandwidth_Bps", planner::FieldValue::of(25e9));
//
// Path: field names separated by '.', as written in the .proto; a repeated field takes an index
// `name[i]` (i < size, or i == size to append an element). Nested messages are created as needed,
// except that a member of a oneof is not entered while another member of that oneof is set (that
// would silently replace it: `fabric.fat_tree.oversubscription` on a rail-optimised cluster).
//
// Values: a number or a text.
//   - integer fields (int32, int64, uint32, uint64): a number with no fractional part within the
//     type's range;
//   - double: any finite number; float: finite and within float's range;
//   - bool: 0 or 1, or the text "true" / "false";
//   - enum: the value's name (text) or number (a defined one);
//   - string: a text.
// Anything else throws FieldPathError; the message says what was wrong and, for a name that does not
// exist, lists the valid field names at the level that failed.
#pragma once

#include <google/protobuf/descriptor.h>
#include <google/protobuf/message.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>

namespace moesim::planner {

class FieldPathError : public std::runtime_error {
 public:
  // kPath: the path does not lead to a field that can be set; kValue: the value does not suit it.
  enum class Kind { kPath, kValue };
  FieldPathError(Kind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  Kind kind() const { return kind_; }

 private:
  Kind kind_;
};

struct FieldValue {
  std::optional<double> number;  // set for numbers
  std::string text;              // used when number is not set

  static FieldValue of(double v) { return {v, {}}; }
  static FieldValue of(int v) { return {static_cast<double>(v), {}}; }
  static FieldValue of(std::string s) { return {std::nullopt, std::move(s)}; }
  static FieldValue of(const char* s) { return {std::nullopt, s}; }
  // "4.5e+11", "HIERARCHICAL": for messages and labels.
  std::string to_string() const;
};

// Sets the field at `path` in `msg` to `value`. Throws FieldPathError; `msg` may then have been
// given empty nested messages on the way, so apply to a copy when that matters. `shown_as`: what
// messages call `msg` itself ("cluster": "no field 'x' in cluster.node (moesim.hw.NodeTemplate)");
// empty: its type's name.
// Returns the field that was set.
const google::protobuf::FieldDescriptor* set_field(google::protobuf::Message* msg, std::string_view path, const FieldValue& value,
                                                   std::string_view shown_as = "");

// The field names of a message type, in declaration order, comma-separated ("name, device, ...").
std::string field_names(const google::protobuf::Descriptor& type);

}  // namespace moesim::planner
