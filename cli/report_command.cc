// `moesim report`: figures (PNG + SVG) and a report.md from the results store, drawn by the
// matplotlib scripts in reports/ (reports/report.py) under /usr/bin/python3.
#include "cli/commands.h"
#include "traces/store.h"

#include <fmt/format.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace moesim::cli {
namespace {

namespace fs = std::filesystem;

constexpr const char* kPython = "/usr/bin/python3";  // Debian's, where python3-matplotlib installs

// The interpreter: MOESIM_PYTHON when set (tests use it), else Debian's python3.
std::string python() {
  const char* env = std::getenv("MOESIM_PYTHON");
  return env && *env ? env : kPython;
}

int fail(const std::string& message) {
  std::cerr << "moesim report: " << message << '\n';
  return kExitBadInput;
}

int report(const Args& a) {
  if (!a.positional().empty()) throw UsageError(fmt::format("unexpected argument '{}'", a.positional()[0]));
  if (!a.has("--db")) throw UsageError("missing --db FILE (the results store to plot)");
  if (!a.has("--out")) throw UsageError("missing --out FOLDER (where the figures and report.md go)");
  const std::string db = a.get("--db");
  const std::string out = a.get("--out");

  // Store::open creates a missing file; a report needs one that exists. Opening it checks that it
  // is a moesim store of a schema this binary knows (a StoreError otherwise: exit 2, untouched).
  std::error_code ec;
  if (!fs::exists(db, ec)) return fail(fmt::format("--db {}: no such file (a results store written with --db)", db));
  if (fs::is_regular_file(db, ec) && fs::file_size(db, ec) == 0)
    return fail(fmt::format("--db {}: is empty, not a results store", db));  // SQLite would make it one
  Store::open(db);

  const std::string interpreter = python();
  if (::access(interpreter.c_str(), X_OK) != 0)
    return fail(fmt::format("{} not found: the figures are drawn by Debian's python3 with python3-matplotlib "
                            "(scripts/install-deps installs both)",
                            interpreter));
  const std::string script = std::string(MOESIM_REPORTS_DIR) + "/report.py";
  if (!fs::is_regular_file(script)) {
    std::cerr << fmt::format("moesim report: the report scripts are missing ({} not found; moesim runs them from its source tree)\n", script);
    return kExitInternal;
  }

  // The script creates the folder once it has matplotlib, so a missing matplotlib writes nothing.
  if (fs::exists(out, ec) && !fs::is_directory(out, ec)) return fail(fmt::format("--out {}: is a file, not a folder", out));

  std::vector<std::string> args = {interpreter, "-B", script, "--db", db, "--out", out};
  if (a.flag("--json")) args.push_back("--json");
  std::vector<char*> argv;
  for (std::string& s : args) argv.push_back(s.data());
  argv.push_back(nullptr);
  std::cout.flush();
  pid_t pid = 0;
  if (int rc = ::posix_spawn(&pid, interpreter.c_str(), nullptr, nullptr, argv.data(), environ); rc != 0)
    return fail(fmt::format("cannot start {}: {}", interpreter, std::strerror(rc)));
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  // The script exits 2 for bad input (its message is already on stderr) and 1 when it failed.
  if (WIFEXITED(status) && (WEXITSTATUS(status) == kExitOk || WEXITSTATUS(status) == kExitBadInput)) return WEXITSTATUS(status);
  std::cerr << fmt::format("moesim report: {} failed ({})\n", script,
                           WIFEXITED(status) ? fmt::format("exit {}", WEXITSTATUS(status)) : fmt::format("signal {}", WTERMSIG(status)));
  return kExitInternal;
}

}  // namespace

std::vector<Command> report_commands() {
  return {
      {"report", "figures (PNG + SVG) and report.md from the results store",
       "usage: moesim report --db FILE --out FOLDER [--json]\n\n"
       "  --db FILE     the SQLite results store (written by simulate, sweep, plan or run with --db)\n"
       "  --out FOLDER  where the figures and report.md go (created; files of the same names are replaced)\n"
       "  --json        db, out, report, runs, files (every file written), figures and skipped (each with\n"
       "                the reason)\n\n"
       "Figures, each when the store has its data (report.md says which were skipped and why):\n"
       "  breakdown      step-time breakdown of the most recent simulate runs and sweep points (critical\n"
       "                 and bottleneck rank)\n"
       "  sweep-NAME     per sweep: step time and throughput against the swept values, one line per value\n"
       "                 of the second axis, one panel per value of the third\n"
       "  memory         peak memory per rank against capacity (most recent simulate run)\n"
       "  expert-load    tokens per expert per MoE layer (most recent run that has it)\n"
       "  links          utilisation of the busiest links (most recent simulate run)\n\n"
       "The scripts (reports/*.py) read only the store, so any past run can be re-plotted, and the same\n"
       "store gives byte-identical files. They run under /usr/bin/python3 with Debian's\n"
       "python3-matplotlib (MOESIM_PYTHON overrides the interpreter). Exit 2 when the store is missing or\n"
       "not moesim's, --out is a file, or python3 or matplotlib is missing.\n",
       {{}, {"--db", "--out"}},
       report},
  };
}

}  // namespace moesim::cli
