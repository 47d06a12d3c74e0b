#include "common/config.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/io/tokenizer.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

namespace moesim {

namespace pb = google::protobuf;

void Diagnostics::throw_if_any() const {
  if (items_.empty()) return;
  // Files in the order their first problem was found, each file's problems in line order.
  std::vector<std::string> files;
  for (const Diagnostic& d : items_)
    if (std::find(files.begin(), files.end(), d.file) == files.end()) files.push_back(d.file);
  auto key = [&](const Diagnostic& d) {
    return std::pair(std::find(files.begin(), files.end(), d.file) - files.begin(), d.line);
  };
  std::vector<Diagnostic> sorted = items_;
  std::stable_sort(sorted.begin(), sorted.end(), [&](const Diagnostic& a, const Diagnostic& b) { return key(a) < key(b); });
  throw ConfigError(std::move(sorted));
}

ConfigScope::ConfigScope(const pb::Message& msg, const ParseInfoTree* tree, std::string file,
                         std::string path, int line, Diagnostics* out)
    : msg_(&msg), tree_(tree), file_(std::move(file)), path_(std::move(path)), line_(line), out_(out) {}

const pb::FieldDescriptor* ConfigScope::field(std::string_view name) const {
  const pb::FieldDescriptor* f = msg_->GetDescriptor()->FindFieldByName(std::string(name));
  MOESIM_ASSERT(f != nullptr, "{} has no field {}", msg_->GetDescriptor()->full_name(), name);
  return f;
}

std::string ConfigScope::path_of(std::string_view name, int index) const {
  std::string p = path_.empty() ? std::string(name) : (name.empty() ? path_ : path_ + "." + std::string(name));
  if (index >= 0) p += fmt::format("[{}]", index);
  return p;
}

int ConfigScope::line_of(std::string_view name, int index) const {
  if (tree_ == nullptr || name.empty()) return line_;
  const pb::FieldDescriptor* f = field(name);
  if (f->is_repeated() && index < 0) index = 0;
  pb::TextFormat::ParseLocation loc = tree_->GetLocation(f, f->is_repeated() ? index : -1);
  // Elements of a list (`field: [a, b, c]`) may have no location of their own: use the field's.
  if (loc.line < 0 && f->is_repeated() && index > 0) loc = tree_->GetLocation(f, 0);
  return loc.line >= 0 ? loc.line + 1 : line_;
}

ConfigScope ConfigScope::child(std::string_view name, int index) const {
  const pb::FieldDescriptor* f = field(name);
  MOESIM_ASSERT(f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE, "{} is not a message", name);
  const pb::Reflection* r = msg_->GetReflection();
  const pb::Message& sub = f->is_repeated() ? r->GetRepeatedMessage(*msg_, f, index) : r->GetMessage(*msg_, f);
  const ParseInfoTree* sub_tree = tree_ ? tree_->GetTreeForNested(f, f->is_repeated() ? index : -1) : nullptr;
  return ConfigScope(sub, sub_tree, file_, path_of(name, index), line_of(name, index), out_);
}

void ConfigScope::error(std::string_view name, std::string message, int index) const {
  out_->add(Diagnostic{file_, line_of(name, index), 0, path_of(name, index), std::move(message)});
}

bool ConfigScope::has(std::string_view name) const {
  const pb::FieldDescriptor* f = field(name);
  const pb::Reflection* r = msg_->GetReflection();
  return f->is_repeated() ? r->FieldSize(*msg_, f) > 0 : r->HasField(*msg_, f);
}

bool ConfigScope::require(std::string_view name) const {
  if (has(name)) return true;
  error(name, "missing required value");
  return false;
}

double ConfigScope::number(std::string_view name) const {
  const pb::FieldDescriptor* f = field(name);
  const pb::Reflection* r = msg_->GetReflection();
  switch (f->cpp_type()) {
    case pb::FieldDescriptor::CPPTYPE_DOUBLE: return r->GetDouble(*msg_, f);
    case pb::FieldDescriptor::CPPTYPE_FLOAT: return r->GetFloat(*msg_, f);
    case pb::FieldDescriptor::CPPTYPE_INT32: return r->GetInt32(*msg_, f);
    case pb::FieldDescriptor::CPPTYPE_INT64: return static_cast<double>(r->GetInt64(*msg_, f));
    case pb::FieldDescriptor::CPPTYPE_UINT32: return r->GetUInt32(*msg_, f);
    case pb::FieldDescriptor::CPPTYPE_UINT64: return static_cast<double>(r->GetUInt64(*msg_, f));
    case pb::FieldDescriptor::CPPTYPE_ENUM: return r->GetEnumValue(*msg_, f);
    default: MOESIM_ASSERT(false, "{} is not numeric", name);
  }
  return 0;
}

bool ConfigScope::positive(std::string_view name, Need need, bool allow_zero, double max) const {
  if (!has(name)) {
    if (need == Need::kRequired) error(name, "missing required value");
    return false;
  }
  double v = number(name);
  if (!std::isfinite(v)) {
    error(name, fmt::format("must be a finite number, got {}", v));
    return false;
  }
  if (v < 0 || (v == 0 && !allow_zero)) {
    error(name, fmt::format("must be {}, got {}", allow_zero ? "zero or more" : "greater than zero", v));
    return false;
  }
  if (v > max) {
    error(name, fmt::format("must be at most {:g}, got {:g}", max, v));
    return false;
  }
  return true;
}

bool ConfigScope::in_range(std::string_view name, double lo, double hi, Need need) const {
  if (!has(name)) {
    if (need == Need::kRequired) error(name, "missing required value");
    return false;
  }
  double v = number(name);
  if (!std::isfinite(v) || v < lo || v > hi) {
    error(name, fmt::format("must be between {} and {}, got {}", lo, hi, v));
    return false;
  }
  return true;
}

namespace {

class CollectErrors : public pb::io::ErrorCollector {
 public:
  CollectErrors(std::string file, std::vector<Diagnostic>* out) : file_(std::move(file)), out_(out) {}
  void AddError(int line, pb::io::ColumnNumber column, const std::string& message) override {
    out_->push_back(Diagnostic{file_, line + 1, column + 1, "", message});
  }
  void AddWarning(int line, pb::io::ColumnNumber column, const std::string& message) override {
    // Deprecated-field and similar warnings are promoted: configs must be unambiguous.
    out_->push_back(Diagnostic{file_, line + 1, column + 1, "", message});
  }

 private:
  std::string file_;
  std::vector<Diagnostic>* out_;
};

// protobuf's text parser reports some errors (an unknown enum value, for one) at the token after
// the offending one, often on the next line. For the errors that quote the offending token, move
// the position back to the token's last occurrence before the reported one (within 3 lines).
void point_at_quoted_token(const std::string& text, Diagnostic* d) {
  const bool names_its_token = d->message.find("Unknown enumeration value") != std::string::npos ||
                               d->message.find("has no field named") != std::string::npos;
  if (!names_its_token) return;
  std::vector<size_t> line_start{0};
  for (size_t i = 0; i < text.size(); ++i)
    if (text[i] == '\n') line_start.push_back(i + 1);
  if (d->line < 1 || static_cast<size_t>(d->line) > line_start.size()) return;
  const size_t reported = std::min(text.size(), line_start[d->line - 1] + std::max(0, d->column - 1));
  const size_t floor = line_start[std::max(0, d->line - 4)];
  size_t best = std::string::npos;
  for (size_t q = d->message.find('"'); q != std::string::npos; q = d->message.find('"', q + 1)) {
    const size_t end = d->message.find('"', q + 1);
    if (end == std::string::npos) break;
    const std::string token = d->message.substr(q + 1, end - q - 1);
    q = end;
    if (token.empty() || reported < token.size()) continue;
    const size_t at = text.rfind(token, reported - 1);
    if (at != std::string::npos && at >= floor && (best == std::string::npos || at > best)) best = at;
  }
  if (best == std::string::npos) return;
  auto it = std::upper_bound(line_start.begin(), line_start.end(), best);
  d->line = static_cast<int>(it - line_start.begin());
  d->column = static_cast<int>(best - line_start[d->line - 1]) + 1;
}

}  // namespace

ConfigDocument ConfigDocument::parse_text(const std::string& text, const std::string& name, pb::Message* msg) {
  ConfigDocument doc;
  doc.msg_ = msg;
  doc.file_ = name;
  doc.tree_ = std::make_unique<ConfigScope::ParseInfoTree>();
  std::vector<Diagnostic> errors;
  CollectErrors collector(name, &errors);
  pb::TextFormat::Parser parser;
  parser.RecordErrorsTo(&collector);
  parser.WriteLocationsTo(doc.tree_.get());
  msg->Clear();
  if (!parser.ParseFromString(text, msg) || !errors.empty()) {
    if (errors.empty()) errors.push_back(Diagnostic{name, 0, 0, "", "could not parse text-format message"});
    for (Diagnostic& d : errors) point_at_quoted_token(text, &d);
    throw ConfigError(std::move(errors));
  }
  return doc;
}

ConfigDocument ConfigDocument::parse_file(const std::string& path, pb::Message* msg) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError({Diagnostic{path, 0, 0, "", "cannot open file"}});
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) throw ConfigError({Diagnostic{path, 0, 0, "", "cannot read file"}});
  return parse_text(text.str(), path, msg);
}

}  // namespace moesim
