// JSON output for --json: protobuf messages printed with their field names as written in the
// .proto (snake_case with units), every field present even when zero, two-space indentation.
#pragma once

#include <google/protobuf/message.h>

#include <string>

namespace moesim {

std::string to_json(const google::protobuf::Message& msg);

}  // namespace moesim
