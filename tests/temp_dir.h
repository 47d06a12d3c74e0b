// A temp folder of this test process's own, removed when the process ends: CTest runs each test
// case as a process of its own, in parallel, so files of one process must not meet another's,
// and none should outlive it (a run of the suite left hundreds in /tmp).
#pragma once

#include <fmt/format.h>
#include <unistd.h>

#include <filesystem>
#include <system_error>
#include <utility>

namespace moesim::test {

inline const std::filesystem::path& process_temp_dir() {
  // Created and removed by one object (no copy whose end would remove it early).
  struct Dir {
    std::filesystem::path path;
    explicit Dir(std::filesystem::path p) : path(std::move(p)) { std::filesystem::create_directories(path); }
    Dir(const Dir&) = delete;
    Dir& operator=(const Dir&) = delete;
    ~Dir() {
      std::error_code ec;
      std::filesystem::remove_all(path, ec);
    }
  };
  static const Dir dir(std::filesystem::temp_directory_path() / fmt::format("moesim_test_{}", ::getpid()));
  return dir.path;
}

}  // namespace moesim::test
