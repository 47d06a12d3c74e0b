#include "common/json.h"

#include "common/error.h"

#include <google/protobuf/util/json_util.h>

namespace moesim {

std::string to_json(const google::protobuf::Message& msg) {
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string out;
  auto status = google::protobuf::util::MessageToJsonString(msg, &out, options);
  MOESIM_ASSERT(status.ok(), "JSON export of {} failed: {}", msg.GetTypeName(), status.ToString());
  return out;
}

}  // namespace moesim
