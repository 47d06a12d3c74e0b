#include "common/json.h"

#include "common/error.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/type_resolver.h>
#include <google/protobuf/util/type_resolver_util.h>

#include <memory>

namespace moesim {

std::string to_json(const google::protobuf::Message& msg) {
  namespace pb = google::protobuf;
  // MessageToJsonString prints map fields in the map's iteration order, which protobuf varies from
  // process to process; deterministic serialization sorts map entries by key, so the same message
  // always prints the same text.
  std::string binary;
  {
    pb::io::StringOutputStream stream(&binary);
    pb::io::CodedOutputStream coded(&stream);
    coded.SetSerializationDeterministic(true);
    const bool serialized = msg.SerializeToCodedStream(&coded);
    MOESIM_ASSERT(serialized, "serializing {} failed", msg.GetTypeName());
  }
  constexpr const char* kTypeUrlPrefix = "type.googleapis.com";
  const std::unique_ptr<pb::util::TypeResolver> resolver(
      pb::util::NewTypeResolverForDescriptorPool(kTypeUrlPrefix, msg.GetDescriptor()->file()->pool()));
  pb::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string out;
  auto status = pb::util::BinaryToJsonString(resolver.get(), fmt::format("{}/{}", kTypeUrlPrefix, msg.GetTypeName()), binary,
                                             &out, options);
  MOESIM_ASSERT(status.ok(), "JSON export of {} failed: {}", msg.GetTypeName(), status.ToString());
  return out;
}

}  // namespace moesim
