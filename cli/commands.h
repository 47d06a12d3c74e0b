// The CLI's command table. Each command has a one-line summary (for `moesim --help`), a full
// help text (for `--help`), its accepted flags and a handler returning the exit code.
// Exit codes: 0 success, 2 bad input or usage (the message names file, line and field), 1 an
// internal error of moesim.
#pragma once

#include "cli/args.h"
#include "cli/cli.pb.h"
#include "common/error.h"

#include <functional>
#include <string>
#include <vector>

namespace moesim::cli {

inline constexpr int kExitOk = 0;
inline constexpr int kExitInternal = 1;
inline constexpr int kExitBadInput = 2;

struct Command {
  std::string name;     // "topo show"
  std::string summary;  // one line
  std::string help;     // usage and options
  ArgSpec spec;
  std::function<int(const Args&)> run;
};

std::vector<Command> topo_commands();
std::vector<Command> collective_commands();
std::vector<Command> model_commands();
std::vector<Command> run_commands();
std::vector<Command> simulate_commands();
std::vector<Command> plan_commands();
std::vector<Command> sweep_commands();
std::vector<Command> report_commands();
std::vector<Command> validate_commands();
std::vector<Command> calibrate_commands();

// A ConfigError's diagnostics as the CheckResult `--json` prints.
CheckResult check_result(const ConfigError& e, const std::string& file);

// Reports a ConfigError: every diagnostic on stderr, and as a CheckResult on stdout under --json.
int report_config_error(const ConfigError& e, const std::string& file, bool json);

// The device profile `moesim calibrate --out CLUSTER` writes beside the cluster.
std::string profile_beside(const std::string& cluster);

// The profile a command prices `cluster`'s devices with: --profile, else a calibration's beside the
// cluster when there is one, else "" (the device types' priors).
std::string profile_for(const Args& a, const std::string& cluster);

}  // namespace moesim::cli
