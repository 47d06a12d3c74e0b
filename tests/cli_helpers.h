// Helpers for the end-to-end tests that run the moesim binary (cli_test, sim_cli_test): run it as
// a user does, parse its --json output, write per-process temp files (CTest runs tests in
// parallel: each process writes into a folder of its own, removed when it ends).
#pragma once

#include "temp_dir.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <vector>
#include <sys/wait.h>
#include <unistd.h>

namespace moesim::testing {

struct Run {
  int exit_code = -1;
  std::string out;
  std::string err;
};

// The whole content of a file ("" when it cannot be read).
inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A path in this process's temp folder (removed when the process ends): "<tmp>/moesim_test_<pid>/<name>".
inline std::string temp_path(const std::string& name) { return (test::process_temp_dir() / name).string(); }

// Writes `text` to temp_path(name) and returns that path.
inline std::string write_temp(const std::string& name, const std::string& text) {
  const std::string path = temp_path(name);
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

// A temp file removed at the end of the scope (with SQLite's -wal/-shm companions).
struct TempFile {
  std::string path;
  explicit TempFile(const std::string& name, const std::optional<std::string>& text = std::nullopt) : path(temp_path(name)) {
    remove_all();
    if (text) write_temp(name, *text);
  }
  ~TempFile() { remove_all(); }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  void remove_all() const {
    std::error_code ec;
    for (const char* suffix : {"", "-wal", "-shm", "-journal"}) std::filesystem::remove_all(path + suffix, ec);
  }
};

// Runs `moesim ARGS` from the source tree, capturing stdout and stderr separately.
// `env`: variable assignments put before the command ("MOESIM_MPIRUN=/x"); `launcher`: a command
// that runs moesim ("mpirun -np 2").
inline Run moesim_run(const std::string& args, const std::string& env = "", const std::string& launcher = "") {
  const std::string err_file = temp_path("moesim_cli.err");
  const std::string cmd = fmt::format("cd '{}' && {} {} '{}' {} 2>'{}'", MOESIM_SOURCE_DIR, env, launcher, MOESIM_BINARY, args, err_file);
  Run r;
  FILE* pipe = ::popen(cmd.c_str(), "r");
  REQUIRE(pipe != nullptr);
  std::array<char, 4096> buf;
  for (size_t n; (n = std::fread(buf.data(), 1, buf.size(), pipe)) > 0;) r.out.append(buf.data(), n);
  const int status = ::pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.err = read_file(err_file);
  std::filesystem::remove(err_file);
  return r;
}

// The .textproto files under `dir` and its subfolders, sorted: the bundled configs a test walks.
inline std::vector<std::filesystem::path> textprotos_under(const std::string& dir) {
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::recursive_directory_iterator(dir))
    if (e.path().extension() == ".textproto") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  return files;
}

template <typename Msg>
Msg parse_json(const std::string& text) {
  Msg msg;
  auto status = google::protobuf::util::JsonStringToMessage(text, &msg);
  INFO(text.substr(0, 500));
  REQUIRE(status.ok());
  return msg;
}

}  // namespace moesim::testing
