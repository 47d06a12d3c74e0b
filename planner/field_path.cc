#include "planner/field_path.h"

#include <fmt/format.h>
#include <google/protobuf/descriptor.h>

#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <limits>
#include <string>

namespace moesim::planner {
namespace {

namespace pb = google::protobuf;

FieldPathError path_error(const std::string& message) { return {FieldPathError::Kind::kPath, message}; }
FieldPathError value_error(const std::string& message) { return {FieldPathError::Kind::kValue, message}; }

// One step of a path: `name` or `name[index]`.
struct Step {
  std::string name;
  std::optional<int> index;
};

Step parse_step(std::string_view part, std::string_view path) {
  Step s;
  const size_t open = part.find('[');
  s.name = std::string(part.substr(0, open));
  if (s.name.empty()) throw path_error(fmt::format("'{}': empty field name", path));
  if (open == std::string_view::npos) return s;
  const size_t close = part.find(']', open);
  const std::string_view digits = part.substr(open + 1, close == std::string_view::npos ? std::string_view::npos : close - open - 1);
  if (close != part.size() - 1 || digits.empty() || digits.size() > 9 ||
      digits.find_first_not_of("0123456789") != std::string_view::npos)
    throw path_error(fmt::format("'{}': bad index in '{}' (expected name[N] with N a non-negative integer)", path, part));
  s.index = std::stoi(std::string(digits));
  return s;
}

std::string where(const std::string& at, const pb::Descriptor& type) {
  return at.empty() ? type.full_name() : fmt::format("{} ({})", at, type.full_name());
}

std::string enum_names(const pb::EnumDescriptor& e) {
  std::string out;
  for (int i = 0; i < e.value_count(); ++i) out += (i ? ", " : "") + e.value(i)->name();
  return out;
}

std::string value_text(const FieldValue& v) { return v.number ? v.to_string() : fmt::format("'{}'", v.text); }

// The number an integer field gets; `lo` and `hi` are the type's limits as doubles (hi exclusive
// when `hi_exclusive`, for the 64-bit types whose maximum a double cannot hold exactly).
double integral(const FieldValue& v, const std::string& at, const char* type, double lo, double hi, bool hi_exclusive) {
  if (!v.number) throw value_error(fmt::format("'{}' is {}: expected a number, got the text '{}'", at, type, v.text));
  const double x = *v.number;
  if (!std::isfinite(x) || x != std::floor(x))
    throw value_error(fmt::format("'{}' is {}: {} is not an integer", at, type, x));
  if (x < lo || (hi_exclusive ? x >= hi : x > hi)) throw value_error(fmt::format("'{}' is {}: {} is out of its range", at, type, x));
  return x;
}

void set_scalar(pb::Message* m, const pb::FieldDescriptor* f, std::optional<int> index, const FieldValue& v, const std::string& at) {
  const pb::Reflection* r = m->GetReflection();
  const bool append = f->is_repeated() && *index == r->FieldSize(*m, f);
  constexpr double k2p63 = 9223372036854775808.0, k2p64 = 18446744073709551616.0;
  switch (f->cpp_type()) {
    case pb::FieldDescriptor::CPPTYPE_INT32: {
      constexpr double lo = std::numeric_limits<int32_t>::min(), hi = std::numeric_limits<int32_t>::max();
      const auto x = static_cast<int32_t>(integral(v, at, "int32", lo, hi, false));
      if (!f->is_repeated()) r->SetInt32(m, f, x);
      else if (append) r->AddInt32(m, f, x);
      else r->SetRepeatedInt32(m, f, *index, x);
      return;
    }
    case pb::FieldDescriptor::CPPTYPE_INT64: {
      const auto x = static_cast<int64_t>(integral(v, at, "int64", -k2p63, k2p63, true));
      if (!f->is_repeated()) r->SetInt64(m, f, x);
      else if (append) r->AddInt64(m, f, x);
      else r->SetRepeatedInt64(m, f, *index, x);
      return;
    }
    case pb::FieldDescriptor::CPPTYPE_UINT32: {
      const auto x = static_cast<uint32_t>(integral(v, at, "uint32", 0, std::numeric_limits<uint32_t>::max(), false));
      if (!f->is_repeated()) r->SetUInt32(m, f, x);
      else if (append) r->AddUInt32(m, f, x);
      else r->SetRepeatedUInt32(m, f, *index, x);
      return;
    }
    case pb::FieldDescriptor::CPPTYPE_UINT64: {
      const auto x = static_cast<uint64_t>(integral(v, at, "uint64", 0, k2p64, true));
      if (!f->is_repeated()) r->SetUInt64(m, f, x);
      else if (append) r->AddUInt64(m, f, x);
      else r->SetRepeatedUInt64(m, f, *index, x);
      return;
    }
    case pb::FieldDescriptor::CPPTYPE_DOUBLE:
    case pb::FieldDescriptor::CPPTYPE_FLOAT: {
      const bool is_float = f->cpp_type() == pb::FieldDescriptor::CPPTYPE_FLOAT;
      const char* type = is_float ? "float" : "double";
      if (!v.number) throw value_error(fmt::format("'{}' is {}: expected a number, got the text '{}'", at, type, v.text));
      const double x = *v.number;
      if (!std::isfinite(x)) throw value_error(fmt::format("'{}' is {}: {} is not finite", at, type, x));
      if (is_float) {
        if (std::fabs(x) > std::numeric_limits<float>::max())
          throw value_error(fmt::format("'{}' is float: {} is out of its range", at, x));
        const auto y = static_cast<float>(x);
        if (!f->is_repeated()) r->SetFloat(m, f, y);
        else if (append) r->AddFloat(m, f, y);
        else r->SetRepeatedFloat(m, f, *index, y);
      } else {
        if (!f->is_repeated()) r->SetDouble(m, f, x);
        else if (append) r->AddDouble(m, f, x);
        else r->SetRepeatedDouble(m, f, *index, x);
      }
      return;
    }
    case pb::FieldDescriptor::CPPTYPE_BOOL: {
      bool x = false;
      if (v.number && (*v.number == 0 || *v.number == 1)) x = *v.number == 1;
      else if (!v.number && (v.text == "true" || v.text == "false")) x = v.text == "true";
      else throw value_error(fmt::format("'{}' is bool: expected 0, 1, \"true\" or \"false\", got {}", at, value_text(v)));
      if (!f->is_repeated()) r->SetBool(m, f, x);
      else if (append) r->AddBool(m, f, x);
      else r->SetRepeatedBool(m, f, *index, x);
      return;
    }
    case pb::FieldDescriptor::CPPTYPE_ENUM: {
      const pb::EnumDescriptor& e = *f->enum_type();
      const pb::EnumValueDescriptor* ev = nullptr;
      if (v.number) {
        const double x = *v.number;
        if (x == std::floor(x) && std::fabs(x) <= std::numeric_limits<int32_t>::max()) ev = e.FindValueByNumber(static_cast<int>(x));
      } else {
        ev = e.FindValueByName(v.text);
      }
      if (ev == nullptr)
        throw value_error(
            fmt::format("'{}' is the enum {}: {} is not one of its values ({})", at, e.full_name(), value_text(v), enum_names(e)));
      if (!f->is_repeated()) r->SetEnum(m, f, ev);
      else if (append) r->AddEnum(m, f, ev);
      else r->SetRepeatedEnum(m, f, *index, ev);
      return;
    }
    case pb::FieldDescriptor::CPPTYPE_STRING: {
      if (v.number)
        throw value_error(fmt::format("'{}' is string: expected a text (`strings: [...]`), got the number {}", at, *v.number));
      if (!f->is_repeated()) r->SetString(m, f, v.text);
      else if (append) r->AddString(m, f, v.text);
      else r->SetRepeatedString(m, f, *index, v.text);
      return;
    }
    case pb::FieldDescriptor::CPPTYPE_MESSAGE: break;
  }
  throw path_error(fmt::format("'{}' is a message ({}): name one of its fields: {}", at, f->message_type()->full_name(),
                                   field_names(*f->message_type())));
}

}  // namespace

std::string FieldValue::to_string() const {
  if (!number) return text;
  // The shortest %g form that reads back as the same double: 4.5e+11, 1.05, 4096.
  for (int digits = 1; digits < 17; ++digits) {
    std::string s = fmt::format("{:.{}g}", *number, digits);
    if (std::strtod(s.c_str(), nullptr) == *number) return s;
  }
  return fmt::format("{:.17g}", *number);
}

std::string field_names(const pb::Descriptor& type) {
  std::string out;
  for (int i = 0; i < type.field_count(); ++i) out += (i ? ", " : "") + type.field(i)->name();
  return out;
}

const pb::FieldDescriptor* set_field(pb::Message* msg, std::string_view path, const FieldValue& value, std::string_view shown_as) {
  if (path.empty()) throw path_error("empty field path");
  pb::Message* m = msg;
  std::string at(shown_as);  // the path walked so far, as shown in messages
  size_t begin = 0;
  while (true) {
    const size_t dot = path.find('.', begin);
    const bool last = dot == std::string_view::npos;
    const Step step = parse_step(path.substr(begin, last ? std::string_view::npos : dot - begin), path);
    const pb::Descriptor& type = *m->GetDescriptor();
    const pb::FieldDescriptor* f = type.FindFieldByName(step.name);
    if (f == nullptr)
      throw path_error(fmt::format("no field '{}' in {}; its fields: {}", step.name, where(at, type), field_names(type)));
    const pb::Reflection* r = m->GetReflection();
    if (const pb::OneofDescriptor* oneof = f->containing_oneof(); oneof != nullptr && r->HasOneof(*m, oneof)) {
      const pb::FieldDescriptor* set = r->GetOneofFieldDescriptor(*m, oneof);
      if (set != f) {
        std::string members;
        for (int i = 0; i < oneof->field_count(); ++i) members += (i ? ", " : "") + oneof->field(i)->name();
        throw path_error(fmt::format("{} has '{}' set (one of {}): setting '{}' would replace it", where(at, type), set->name(),
                                     members, step.name));
      }
    }
    at += (at.empty() ? "" : ".") + step.name;
    if (f->is_repeated() && !step.index)
      throw path_error(fmt::format("'{}' is repeated: give an index, e.g. '{}[0]'", at, at));
    if (!f->is_repeated() && step.index) throw path_error(fmt::format("'{}' is not repeated: it takes no index", at));
    if (f->is_repeated()) {
      const int size = r->FieldSize(*m, f);
      if (*step.index > size)
        throw path_error(
            fmt::format("'{}[{}]': index out of range ({} has {} elements; index {} appends one)", at, *step.index, at, size, size));
      at += fmt::format("[{}]", *step.index);
    }
    if (last) {
      set_scalar(m, f, step.index, value, at);
      return f;
    }
    if (f->cpp_type() != pb::FieldDescriptor::CPPTYPE_MESSAGE)
      throw path_error(fmt::format("'{}' is a {} field, not a message: '{}' cannot go below it", at, f->type_name(), path));
    if (!f->is_repeated()) m = r->MutableMessage(m, f);
    else if (*step.index < r->FieldSize(*m, f)) m = r->MutableRepeatedMessage(m, f, *step.index);
    else m = r->AddMessage(m, f);
    begin = dot + 1;
  }
}

}  // namespace moesim::planner
