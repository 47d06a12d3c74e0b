// JSON output for --json: protobuf messages printed with their field names as written in the
// .proto (snake_case with units), every field present even when zero, two-space indentation, map
// entries sorted by key (the same message always prints the same text).
#pragma once

#include <google/protobuf/message.h>

#include <string>

namespace moesim {

std::string to_json(const google::protobuf::Message& msg);

}  // namespace moesim
