#include "cli/launch.h"

#include "cli/args.h"

#include <fmt/format.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace moesim::cli {
namespace {

std::vector<std::string>& stored() {
  static std::vector<std::string> argv;
  return argv;
}

// The size of the MPI launch this process belongs to, from the launchers' environment; 0 outside one.
int launch_size() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS"}) {
    if (const char* v = std::getenv(var)) return std::atoi(v);
  }
  return std::getenv("PMIX_RANK") ? -1 : 0;  // inside a launch of unknown size
}

std::string find_mpirun() {
  if (const char* env = std::getenv("MOESIM_MPIRUN")) return env;
#ifdef MOESIM_MPIEXEC
  if (::access(MOESIM_MPIEXEC, X_OK) == 0) return MOESIM_MPIEXEC;
#endif
  if (const char* path = std::getenv("PATH")) {
    std::string p = path;
    for (size_t s = 0, e; s <= p.size(); s = e + 1) {
      e = p.find(':', s);
      if (e == std::string::npos) e = p.size();
      const std::string candidate = p.substr(s, e - s) + "/mpirun";
      if (::access(candidate.c_str(), X_OK) == 0) return candidate;
    }
  }
  return "";
}

}  // namespace

void set_invocation(int argc, char** argv) { stored().assign(argv, argv + argc); }
const std::vector<std::string>& invocation() { return stored(); }

Launch launch_ranks(int ranks) {
  const int size = launch_size();
  if (size != 0) {
    if (size > 0 && size != ranks)
      throw UsageError(fmt::format("this launch has {} ranks but --ranks is {}: launch with -np {} or drop --ranks",
                                   size, ranks, ranks));
    return {};
  }
  if (ranks <= 1) return {};
  const std::string mpirun = find_mpirun();
  if (mpirun.empty())
    throw UsageError("mpirun not found (install openmpi-bin, put mpirun on PATH or set MOESIM_MPIRUN)");
  std::vector<std::string> args = {mpirun};
  if (::geteuid() == 0) args.push_back("--allow-run-as-root");
  for (const char* a : {"--oversubscribe", "-np"}) args.push_back(a);
  args.push_back(std::to_string(ranks));
  args.push_back(std::filesystem::read_symlink("/proc/self/exe").string());
  args.insert(args.end(), invocation().begin() + 1, invocation().end());
  std::vector<char*> cargs;
  for (std::string& a : args) cargs.push_back(a.data());
  cargs.push_back(nullptr);
  pid_t pid = 0;
  if (int rc = ::posix_spawn(&pid, mpirun.c_str(), nullptr, nullptr, cargs.data(), environ); rc != 0)
    throw UsageError(fmt::format("cannot start {}: {}", mpirun, std::strerror(rc)));
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  Launch l;
  l.relaunched = true;
  l.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 1;
  return l;
}

}  // namespace moesim::cli
