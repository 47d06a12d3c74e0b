// Reading configs: protobuf text format files, parsed once at the boundary, with every field's
// line kept so that validation can point at the exact place of each problem.
//
// A ConfigScope is a view of one (sub)message of a parsed file plus its field path. Validators
// walk scopes and record every problem found (never stop at the first), then throw one
// ConfigError carrying them all:
//
//   Diagnostics diags;
//   ConfigScope root = doc.root(&diags);
//   root.require("name");
//   root.child("node").positive("scaleup_bandwidth_Bps", Need::kRequired);
//   diags.throw_if_any();
#pragma once

#include "common/error.h"

#include <google/protobuf/message.h>
#include <google/protobuf/text_format.h>

#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace moesim {

// Problems found so far while validating one input.
class Diagnostics {
 public:
  void add(Diagnostic d) { items_.push_back(std::move(d)); }
  bool empty() const { return items_.empty(); }
  const std::vector<Diagnostic>& items() const { return items_; }
  // Throws ConfigError with every diagnostic, in file order, if there is any.
  void throw_if_any() const;

 private:
  std::vector<Diagnostic> items_;
};

enum class Need { kOptional, kRequired };

class ConfigScope {
 public:
  using ParseInfoTree = google::protobuf::TextFormat::ParseInfoTree;

  // `tree` may be null (a message built in code): lines then fall back to `line`.
  ConfigScope(const google::protobuf::Message& msg, const ParseInfoTree* tree, std::string file,
              std::string path, int line, Diagnostics* out);

  const google::protobuf::Message& message() const { return *msg_; }
  const std::string& path() const { return path_; }
  const std::string& file() const { return file_; }
  int line() const { return line_; }

  // The nested message `field` (index >= 0 for repeated fields), as a scope.
  ConfigScope child(std::string_view field, int index = -1) const;
  // Where `field` was written, or this scope's own line when it was not written.
  int line_of(std::string_view field, int index = -1) const;
  std::string path_of(std::string_view field, int index = -1) const;

  // Records a problem with `field` (or with the scope itself when field is empty).
  void error(std::string_view field, std::string message, int index = -1) const;

  bool has(std::string_view field) const;
  // Records "missing required value" when `field` is absent.
  bool require(std::string_view field) const;
  // Numeric field: finite, > 0 (>= 0 when allow_zero) and <= max. True when present and valid.
  bool positive(std::string_view field, Need need, bool allow_zero = false,
                double max = std::numeric_limits<double>::infinity()) const;
  // Numeric field: finite and within [lo, hi].
  bool in_range(std::string_view field, double lo, double hi, Need need) const;
  // How many problems have been recorded so far (to tell whether a part validated cleanly).
  size_t problem_count() const { return out_->items().size(); }
  // Value of a numeric (or enum) field as a double (0 when absent).
  double number(std::string_view field) const;

 private:
  const google::protobuf::FieldDescriptor* field(std::string_view name) const;

  const google::protobuf::Message* msg_;
  const ParseInfoTree* tree_;
  std::string file_;
  std::string path_;
  int line_;
  Diagnostics* out_;
};

// A parsed text-format file together with its location tree.
class ConfigDocument {
 public:
  // Parses `path` into `msg`. Unknown fields and syntax errors throw ConfigError naming
  // FILE:LINE:COL. A missing or unreadable file throws ConfigError too.
  static ConfigDocument parse_file(const std::string& path, google::protobuf::Message* msg);
  static ConfigDocument parse_text(const std::string& text, const std::string& name,
                                   google::protobuf::Message* msg);

  ConfigScope root(Diagnostics* out) const { return root_for(*msg_, out); }
  // The same file's locations over another message of the same type (e.g. the parsed message
  // after defaults and presets were filled in): fields that were not written point at the line
  // of their enclosing message.
  ConfigScope root_for(const google::protobuf::Message& same_type, Diagnostics* out) const {
    return ConfigScope(same_type, tree_.get(), file_, "", 1, out);
  }
  const std::string& file() const { return file_; }

 private:
  ConfigDocument() = default;
  const google::protobuf::Message* msg_ = nullptr;
  std::unique_ptr<ConfigScope::ParseInfoTree> tree_;
  std::string file_;
};

}  // namespace moesim
