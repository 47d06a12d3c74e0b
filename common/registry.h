// A named collection of pluggable parts (fabric generators, device types, later collective
// algorithms, routing distributions, planner strategies), each with a one-line description so
// that `moesim list` can show them. Entries keep their registration order.
#pragma once

#include "common/error.h"

#include <string>
#include <string_view>
#include <vector>

namespace moesim {

template <typename T>
class Registry {
 public:
  struct Entry {
    std::string name;
    std::string description;
    T value;
  };

  explicit Registry(std::string kind) : kind_(std::move(kind)) {}

  void add(std::string name, std::string description, T value) {
    MOESIM_ASSERT(find(name) == nullptr, "{} '{}' registered twice", kind_, name);
    entries_.push_back(Entry{std::move(name), std::move(description), std::move(value)});
  }

  const T* find(std::string_view name) const {
    for (const Entry& e : entries_)
      if (e.name == name) return &e.value;
    return nullptr;
  }

  const std::vector<Entry>& entries() const { return entries_; }
  const std::string& kind() const { return kind_; }

  // "a, b, c": for error messages that list the valid choices.
  std::string names() const {
    std::string out;
    for (const Entry& e : entries_) out += (out.empty() ? "" : ", ") + e.name;
    return out;
  }

 private:
  std::string kind_;
  std::vector<Entry> entries_;
};

}  // namespace moesim
