// The command line every `--json`-only benchmark takes.
#pragma once

#include <cstdio>
#include <cstring>
#include <optional>

namespace moesim::bench {

// Reads `[--json]` into `json`. Returns the exit code when the benchmark should stop at once
// (0 after --help, 2 for anything else, with the usage on stderr), nullopt to go on.
inline std::optional<int> parse_json_flag(int argc, char** argv, const char* name, bool& json) {
  json = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--json") == 0) {
      json = true;
    } else {
      std::fprintf(stderr, "usage: %s [--json]\n", name);
      return std::strcmp(argv[i], "--help") == 0 ? 0 : 2;
    }
  }
  return std::nullopt;
}

}  // namespace moesim::bench
