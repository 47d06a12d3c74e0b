// moesim: will this MoE setup fit, how fast will it run, and what should change.
#include "cli/commands.h"
#include "cli/cli.pb.h"
#include "cli/launch.h"
#include "common/json.h"
#include "traces/store.h"

#include <fmt/format.h>

#include <filesystem>
#include <iostream>

namespace moesim::cli {
namespace {

std::string top_help(const std::vector<Command>& commands) {
  std::string out =
      "moesim: simulate, plan and run mixture-of-experts training and serving on described clusters.\n\n"
      "usage: moesim COMMAND [ARGS] [--json] [--help]\n\ncommands:\n";
  for (const Command& c : commands) out += fmt::format("  {:<14}{}\n", c.name, c.summary);
  out += "\n`moesim COMMAND --help` explains one command. Exit codes: 0 ok, 2 bad input, 1 internal error.\n";
  return out;
}

// Finds the longest command name that prefixes argv ("topo show" before "topo").
const Command* match(const std::vector<Command>& commands, const std::vector<std::string>& argv, size_t* used) {
  const Command* best = nullptr;
  for (const Command& c : commands) {
    std::vector<std::string> words;
    for (size_t s = 0, e; s <= c.name.size(); s = e + 1) {
      e = c.name.find(' ', s);
      if (e == std::string::npos) e = c.name.size();
      words.push_back(c.name.substr(s, e - s));
    }
    if (words.size() > argv.size() || (best && words.size() <= *used)) continue;
    if (std::equal(words.begin(), words.end(), argv.begin())) {
      best = &c;
      *used = words.size();
    }
  }
  return best;
}

int run(int argc, char** argv) {
  std::vector<Command> commands = topo_commands();
  for (Command& c : collective_commands()) commands.push_back(std::move(c));
  for (Command& c : model_commands()) commands.push_back(std::move(c));
  for (Command& c : run_commands()) commands.push_back(std::move(c));
  for (Command& c : simulate_commands()) commands.push_back(std::move(c));
  for (Command& c : plan_commands()) commands.push_back(std::move(c));
  for (Command& c : sweep_commands()) commands.push_back(std::move(c));
  for (Command& c : report_commands()) commands.push_back(std::move(c));
  for (Command& c : validate_commands()) commands.push_back(std::move(c));
  for (Command& c : calibrate_commands()) commands.push_back(std::move(c));
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::cout << top_help(commands);
    return args.empty() ? kExitBadInput : kExitOk;
  }
  size_t used = 0;
  const Command* cmd = match(commands, args, &used);
  if (cmd == nullptr) {
    std::string group = args[0];
    bool is_group = false;
    for (const Command& c : commands) is_group |= c.name.rfind(group + " ", 0) == 0;
    if (is_group) {
      std::cerr << fmt::format("moesim {}: missing or unknown subcommand\n\n", group);
      for (const Command& c : commands)
        if (c.name.rfind(group + " ", 0) == 0) std::cerr << fmt::format("  {:<14}{}\n", c.name, c.summary);
    } else {
      std::cerr << fmt::format("moesim: unknown command '{}'\n\n", args[0]) << top_help(commands);
    }
    return kExitBadInput;
  }
  std::vector<std::string> rest(args.begin() + used, args.end());
  for (const std::string& a : rest)
    if (a == "--help" || a == "-h") {
      std::cout << fmt::format("moesim {}: {}\n\n{}", cmd->name, cmd->summary, cmd->help);
      return kExitOk;
    }
  try {
    ArgSpec spec = cmd->spec;
    spec.flags.insert("--json");
    return cmd->run(Args(rest, spec));
  } catch (const UsageError& e) {
    std::cerr << fmt::format("moesim {}: {}\n\n{}", cmd->name, e.what(), cmd->help);
    return kExitBadInput;
  }
}

}  // namespace

CheckResult check_result(const ConfigError& e, const std::string& file) {
  CheckResult r;
  r.set_file(file);
  r.set_ok(false);
  for (const Diagnostic& d : e.diagnostics()) {
    Problem* p = r.add_errors();
    p->set_file(d.file);
    p->set_line(d.line);
    p->set_column(d.column);
    p->set_field(d.field_path);
    p->set_message(d.message);
  }
  return r;
}

std::string profile_beside(const std::string& cluster) {
  return std::filesystem::path(cluster).replace_extension().string() + ".profile.textproto";
}

std::string profile_for(const Args& a, const std::string& cluster) {
  if (a.has("--profile")) return a.get("--profile");
  const std::string beside = profile_beside(cluster);
  return std::filesystem::is_regular_file(beside) ? beside : std::string();
}

int report_config_error(const ConfigError& e, const std::string& file, bool json) {
  for (const Diagnostic& d : e.diagnostics()) std::cerr << d.to_string() << '\n';
  if (json) {
    std::cout << to_json(check_result(e, file));
  }
  return kExitBadInput;
}

}  // namespace moesim::cli

int main(int argc, char** argv) {
  moesim::cli::set_invocation(argc, argv);
  try {
    return moesim::cli::run(argc, argv);
  } catch (const moesim::ConfigError& e) {
    return moesim::cli::report_config_error(e, "", false);
  } catch (const moesim::StoreError& e) {
    // A results database that cannot be used (another schema, newer, corrupt, locked): bad input.
    std::cerr << "moesim: results store " << e.what() << '\n';
    return moesim::cli::kExitBadInput;
  } catch (const std::exception& e) {
    std::cerr << "moesim: internal error: " << e.what() << '\n';
    return moesim::cli::kExitInternal;
  }
}
