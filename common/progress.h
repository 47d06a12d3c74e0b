// Progress for long work: a one-line bar with an ETA on stderr, drawn only when both stdout and
// stderr are terminals (quiet in pipes, files and CI). Thread-safe; redraws at most 10 times a
// second.
#pragma once

#include <chrono>
#include <cstddef>
#include <mutex>
#include <string>

namespace moesim {

class Progress {
 public:
  Progress(std::string label, size_t total);  // enabled when stdout and stderr are terminals
  Progress(std::string label, size_t total, bool enabled);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  void set_total(size_t total);  // when the amount of work is known only later
  void advance(size_t n = 1);    // n more units done
  bool enabled() const { return enabled_; }

 private:
  void draw(size_t done);

  std::string label_;
  size_t total_;
  bool enabled_;
  std::mutex mu_;
  size_t done_ = 0;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

}  // namespace moesim
