#include "common/error.h"

namespace moesim {
namespace {

std::string join(const std::vector<Diagnostic>& diagnostics) {
  std::string out;
  for (const Diagnostic& d : diagnostics) {
    if (!out.empty()) out += '\n';
    out += d.to_string();
  }
  return out;
}

}  // namespace

std::string Diagnostic::to_string() const {
  std::string where = file.empty() ? "<input>" : file;
  if (line > 0) where += fmt::format(":{}", line);
  if (column > 0) where += fmt::format(":{}", column);
  if (field_path.empty()) return fmt::format("{}: {}", where, message);
  return fmt::format("{}: {}: {}", where, field_path, message);
}

ConfigError::ConfigError(std::vector<Diagnostic> diagnostics)
    : std::runtime_error(join(diagnostics)), diagnostics_(std::move(diagnostics)) {}

void assert_fail(const char* cond, const char* file, int line, const std::string& msg) {
  throw InternalError(fmt::format("{}:{}: internal error: assertion `{}` failed: {}", file, line, cond, msg));
}

}  // namespace moesim
