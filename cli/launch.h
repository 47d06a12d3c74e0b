// Launching ranks: `moesim run --ranks N` starts itself under mpirun (with the flags this machine
// needs, also as root), or, when it already runs inside an mpirun/srun launch, checks that the
// launch has the ranks asked for. The same binary and command line scale from one machine to a
// cluster: on a cluster, launch with the site's mpirun/srun and moesim joins that launch.
#pragma once

#include <string>
#include <vector>

namespace moesim::cli {

// The command line this process was started with (argv[0] first); set once by main().
void set_invocation(int argc, char** argv);
const std::vector<std::string>& invocation();

struct Launch {
  bool relaunched = false;  // this process started mpirun and waited for it: exit with exit_code
  int exit_code = 0;
};

// When ranks > 1 and this process is not inside an MPI launch: runs
//   mpirun [--allow-run-as-root] --oversubscribe -np RANKS <this binary> <same arguments>
// and waits (relaunched = true). Inside an MPI launch, or for one rank, returns relaunched = false
// and the caller goes on. Throws UsageError (exit 2, before any rank starts) when mpirun cannot be
// found or started, or when an existing launch has a different number of ranks than `ranks`.
Launch launch_ranks(int ranks);

}  // namespace moesim::cli
