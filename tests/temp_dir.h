// A temp folder of this test process's own, removed when the process ends: CTest runs each test
// case as a process of its own, in parallel, so files of one process must not meet another's,
// and none should outlive it (a run of the suite left hundreds in /tmp).
#pragma once

#include <fmt/format.h>
#include <unistd.h>

#include <filesystem>
#include <system_error>

namespace moesim::test {

inline const std::filesystem::path& process_temp_dir() {
  struct Dir {
    std::filesystem::path path;
    ~Dir() {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  };
  static const Dir dir = [] {
    Dir d{std::filesystem::temp_directory_path() / fmt::format("moesim_test_{}", ::getpid())};
    std::filesystem::create_directories(d.path);
    return d;
  }();
  return dir.path;
}

}  // namespace moesim::test
