// Errors, in three tiers (../shared/CONVENTIONS.md):
//   - MOESIM_ASSERT: broken invariants inside moesim (a bug, not the user's fault);
//   - ConfigError: bad user input, one Diagnostic per problem found, each naming file, line and
//     field path, so the CLI can print them all and exit 2;
//   - library call checks (MPI/CUDA/NCCL) come with the executor.
// The library never exits; the CLI maps these to messages and exit codes.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace moesim {

// One problem in a user's input. line and column are 1-based; 0 means unknown.
struct Diagnostic {
  std::string file;
  int line = 0;
  int column = 0;
  std::string field_path;  // e.g. "node.nic[1].bandwidth_Bps"; empty for parse errors
  std::string message;

  // "FILE:LINE: field.path: message" (or "FILE:LINE:COL: message" for parse errors).
  std::string to_string() const;
};

class ConfigError : public std::runtime_error {
 public:
  explicit ConfigError(std::vector<Diagnostic> diagnostics);
  const std::vector<Diagnostic>& diagnostics() const { return diagnostics_; }

 private:
  std::vector<Diagnostic> diagnostics_;
};

// An invariant of moesim itself was broken.
class InternalError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

[[noreturn]] void assert_fail(const char* cond, const char* file, int line, const std::string& msg);

}  // namespace moesim

#define MOESIM_ASSERT(cond, ...)                                                          \
  do {                                                                                    \
    if (!(cond)) ::moesim::assert_fail(#cond, __FILE__, __LINE__, fmt::format(__VA_ARGS__)); \
  } while (0)
