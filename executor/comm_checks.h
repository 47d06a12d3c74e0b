// Internal to the comm engines (mpi_comm.cc, nccl_comm.cu): checks of a call's arguments that
// both engines make the same way, failing with exec::Error "rank R: CALL on GROUP: problem".
#pragma once

#include "executor/error.h"

#include <fmt/format.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moesim::exec::detail {

// User tags are [0, kMaxUserTag); the engines keep kMaxUserTag (MPI guarantees MPI_TAG_UB >= 32767)
// for their own all-to-all messages.
inline constexpr int kMaxUserTag = 32767;

// One group as a call sees it: the world rank for messages, the group's name, this rank's index
// in the group and its size.
struct CallSite {
  std::string world_rank;
  std::string_view group;
  int rank = 0;
  int size = 0;
  std::string_view what;  // the call: "all_to_all_v", "send", ...

  [[noreturn]] void usage_error(const std::string& message) const {
    throw Error(fmt::format("rank {}: {} on {}: {}", world_rank, what, group, message));
  }
  void check_count(std::string_view field, int64_t n) const {
    if (n < 0) usage_error(fmt::format("{} = {} is negative", field, n));
  }
  void check_counts(std::string_view field, const std::vector<int64_t>& counts) const {
    if (static_cast<int>(counts.size()) != size)
      usage_error(fmt::format("{} has {} entries, the group has {} ranks", field, counts.size(), size));
    for (int r = 0; r < size; ++r)
      if (counts[static_cast<size_t>(r)] < 0)
        usage_error(fmt::format("{}[{}] = {} is negative", field, r, counts[static_cast<size_t>(r)]));
  }
  void check_peer(int peer, int tag) const {
    if (peer < 0 || peer >= size || peer == rank)
      usage_error(fmt::format("peer {} is not another rank of this group of {}", peer, size));
    if (tag < 0 || tag >= kMaxUserTag) usage_error(fmt::format("tag {} is outside [0, {})", tag, kMaxUserTag));
  }
};

}  // namespace moesim::exec::detail
