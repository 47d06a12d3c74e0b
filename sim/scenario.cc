#include "sim/scenario.h"

#include "common/config.h"
#include "sim/scenario.pb.h"

#include <fmt/format.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

namespace moesim::sim {
namespace {

namespace fs = std::filesystem;

// The text of the message written as `field { ... }` (or `field < ... >`) starting at `line`
// (1-based), padded with newlines so that its lines keep their numbers in the scenario file.
std::optional<std::string> inline_text(const std::string& file_text, const std::string& field, int line) {
  size_t pos = 0;
  for (int l = 1; l < line && pos != std::string::npos; ++l) {
    pos = file_text.find('\n', pos);
    if (pos != std::string::npos) ++pos;
  }
  if (pos == std::string::npos) return std::nullopt;
  pos = file_text.find(field, pos);
  if (pos == std::string::npos) return std::nullopt;
  const size_t open = file_text.find_first_of("{<", pos + field.size());
  if (open == std::string::npos) return std::nullopt;
  const char close_char = file_text[open] == '{' ? '}' : '>';
  const char open_char = file_text[open];
  int depth = 0;
  char quote = 0;
  for (size_t i = open; i < file_text.size(); ++i) {
    const char c = file_text[i];
    if (quote) {
      if (c == '\\') ++i;
      else if (c == quote) quote = 0;
      continue;
    }
    if (c == '#') {
      const size_t eol = file_text.find('\n', i);
      if (eol == std::string::npos) break;
      i = eol;
      continue;
    }
    if (c == '"' || c == '\'') quote = c;
    else if (c == open_char) ++depth;
    else if (c == close_char && --depth == 0) {
      const int first_line = 1 + static_cast<int>(std::count(file_text.begin(), file_text.begin() + open, '\n'));
      return std::string(first_line - 1, '\n') + file_text.substr(open + 1, i - open - 1);
    }
  }
  return std::nullopt;
}

struct InlineField {
  std::string field;  // "strategy_inline"
  int line = 0;       // where it is written in the scenario file
};

// Problems of inline configs (each loaded under its label "<scenario>#<field>_inline") as problems
// of the scenario file: field paths under the inline field, and problems of an inline message as a
// whole (its root, line 1 of the padded text) at the line where the inline field is written.
[[noreturn]] void throw_in_scenario(const ConfigError& e, const std::string& path,
                                    const std::map<std::string, InlineField>& inline_at) {
  Diagnostics out;
  for (Diagnostic d : e.diagnostics()) {
    if (auto it = inline_at.find(d.file); it != inline_at.end()) {
      d.file = path;
      d.field_path = d.field_path.empty() ? it->second.field : it->second.field + "." + d.field_path;
      if (d.line <= 1) d.line = it->second.line, d.column = 0;
    }
    out.add(std::move(d));
  }
  out.throw_if_any();
  throw e;
}

}  // namespace

Scenario load_scenario(const std::string& path) {
  scenario::Scenario spec;
  ConfigDocument doc = ConfigDocument::parse_file(path, &spec);
  std::ifstream in(path);
  std::stringstream buf;
  buf << in.rdbuf();
  const std::string text = buf.str();
  Diagnostics diags;
  ConfigScope root = doc.root(&diags);
  const fs::path dir = fs::path(path).parent_path();

  Scenario s;
  s.path = path;
  s.name = spec.has_name() ? spec.name() : fs::path(path).stem().string();
  s.seed = spec.seed();
  if (spec.routing_samples() < 0) root.error("routing_samples", "must be 0 (a fresh draw per micro-batch) or more");
  s.routing_samples = spec.routing_samples();

  // One of the four: a path that exists, or an inline message (loaded under its label, so that its
  // problems can be told apart from the other inline messages' below).
  std::map<std::string, InlineField> inline_at;
  auto source = [&](const char* field, bool has_path, const std::string& rel, bool has_inline,
                    std::string* label) -> cost::ConfigSource {
    const std::string inline_field = std::string(field) + "_inline";
    if (has_path) {
      const fs::path p = fs::path(rel).is_absolute() ? fs::path(rel) : dir / rel;
      if (rel.empty()) root.error(field, "empty path");
      else if (!fs::is_regular_file(p)) root.error(field, fmt::format("no such file: {}", p.string()));
      *label = p.lexically_normal().string();
      return {p.lexically_normal().string(), std::nullopt};
    }
    if (has_inline) {
      *label = fmt::format("{}#{}", path, inline_field);
      inline_at[*label] = {inline_field, root.line_of(inline_field)};
      std::optional<std::string> t = inline_text(text, inline_field, root.line_of(inline_field));
      if (!t) root.error(inline_field, "cannot find the inline message's braces");
      return {*label, t};
    }
    root.error(field, fmt::format("missing: give `{0}: \"PATH\"` or `{0}_inline {{ ... }}`", field));
    return {};
  };
  const cost::ConfigSource cluster = source("cluster", spec.has_cluster(), spec.cluster(), spec.has_cluster_inline(), &s.cluster);
  const cost::ConfigSource model = source("model", spec.has_model(), spec.model(), spec.has_model_inline(), &s.model);
  const cost::ConfigSource workload =
      source("workload", spec.has_workload(), spec.workload(), spec.has_workload_inline(), &s.workload);
  const cost::ConfigSource strategy =
      source("strategy", spec.has_strategy(), spec.strategy(), spec.has_strategy_inline(), &s.strategy);
  std::string profile_path;
  if (spec.has_device_profile()) {
    const fs::path p = fs::path(spec.device_profile()).is_absolute() ? fs::path(spec.device_profile()) : dir / spec.device_profile();
    if (!fs::is_regular_file(p)) root.error("device_profile", fmt::format("no such file: {}", p.string()));
    profile_path = p.lexically_normal().string();
  }
  diags.throw_if_any();
  try {
    s.setup = cost::load_setup(cluster, model, workload, strategy);
  } catch (const ConfigError& e) {
    throw_in_scenario(e, path, inline_at);
  }
  if (!profile_path.empty()) s.profile = cost::load_device_profile(profile_path);
  return s;
}

Scenario scenario_from_files(const std::string& cluster, const std::string& model, const std::string& workload,
                             const std::string& strategy) {
  Scenario s;
  s.setup = cost::load_setup(cluster, model, workload, strategy);
  s.name = fmt::format("{} on {}", s.setup.model->name(), s.setup.cluster->name());
  s.cluster = cluster;
  s.model = model;
  s.workload = workload;
  s.strategy = strategy;
  return s;
}

}  // namespace moesim::sim
