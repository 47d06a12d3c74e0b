#include "common/progress.h"

#include <fmt/format.h>

#include <cstdio>
#include <unistd.h>

namespace moesim {

Progress::Progress(std::string label, size_t total)
    : Progress(std::move(label), total, ::isatty(STDOUT_FILENO) && ::isatty(STDERR_FILENO)) {}

Progress::Progress(std::string label, size_t total, bool enabled)
    : label_(std::move(label)), total_(total), enabled_(enabled),
      start_(std::chrono::steady_clock::now()), last_draw_(start_) {}

Progress::~Progress() {
  if (enabled_) std::fprintf(stderr, "\r\033[K");  // leave the terminal clean
}

void Progress::set_total(size_t total) {
  std::lock_guard lock(mu_);
  total_ = total;
}

void Progress::advance(size_t n) {
  if (!enabled_) return;
  std::lock_guard lock(mu_);
  done_ += n;
  if (total_ == 0) return;
  const auto now = std::chrono::steady_clock::now();
  if (now - last_draw_ < std::chrono::milliseconds(100) && done_ < total_) return;
  last_draw_ = now;
  draw(done_);
}

void Progress::draw(size_t done) {
  constexpr int kWidth = 30;
  const double fraction = static_cast<double>(done) / static_cast<double>(total_);
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const int filled = static_cast<int>(fraction * kWidth);
  std::string eta = done > 0 ? fmt::format("ETA {:.0f} s", elapsed * (1 - fraction) / fraction) : "";
  std::fprintf(stderr, "\r\033[K%s [%s%s] %zu/%zu %s", label_.c_str(), std::string(filled, '#').c_str(),
               std::string(kWidth - filled, '.').c_str(), done, total_, eta.c_str());
  std::fflush(stderr);
}

}  // namespace moesim
