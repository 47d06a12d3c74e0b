// A small command-line parser: positional arguments, `--flag`, `--option VALUE` / `--option=VALUE`.
// Unknown options are usage errors (exit 2), never silently ignored.
#pragma once

#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

namespace moesim::cli {

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct ArgSpec {
  std::set<std::string> flags;    // e.g. "--json"
  std::set<std::string> options;  // take a value, e.g. "--threads"
};

class Args {
 public:
  Args(const std::vector<std::string>& argv, const ArgSpec& spec);
  const std::vector<std::string>& positional() const { return positional_; }
  bool flag(const std::string& name) const { return flags_.count(name) > 0; }
  bool has(const std::string& name) const { return options_.count(name) > 0; }
  std::string get(const std::string& name, const std::string& fallback = "") const;
  // An integer option within [lo, hi]; UsageError naming the option otherwise.
  int get_int(const std::string& name, int fallback, int lo, int hi) const;
  // A finite number option within [lo, hi]; UsageError naming the option otherwise.
  double get_double(const std::string& name, double fallback, double lo, double hi) const;

 private:
  std::vector<std::string> positional_;
  std::set<std::string> flags_;
  std::map<std::string, std::string> options_;
};

}  // namespace moesim::cli
