// What `moesim run`, `moesim validate` and `moesim calibrate` share to run the executor on real
// ranks: the device choice, refusing bad input before any rank starts, gathering the ranks'
// traces on rank 0, and running a body on every rank with a back end and communicators.
#pragma once

#include "cli/args.h"
#include "cli/commands.h"
#include "common/error.h"
#include "costmodel/strategy.pb.h"
#include "executor/backend.h"
#include "executor/comm.h"
#include "executor/error.h"
#include "executor/moe_layer.h"
#include "executor/train.h"
#include "traces/recorder.h"
#include "traces/trace.pb.h"

#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <thread>
#include <memory>
#include <unistd.h>
#include <string>
#include <vector>

namespace moesim::cli {

inline exec::RoutingPolicy policy_of(const Args& a, exec::RoutingPolicy fallback) {
  if (!a.has("--routing")) return fallback;
  auto p = exec::routing_policy_from_name(a.get("--routing"));
  if (!p) throw UsageError(fmt::format("--routing: expected vanilla, batch_priority or no_drop, got '{}'", a.get("--routing")));
  return *p;
}

// --device: cpu (OpenBLAS back end, MPI between ranks) or cuda (CUDA back end, one GPU per rank:
// local rank % devices, NCCL between ranks, bootstrapped over MPI). A CUDA request this build or
// machine cannot serve is refused before any rank starts (exit 2), never run on the CPU instead.
inline exec::Device check_device(const Args& a, int ranks) {
  const std::string device = a.get("--device", "cpu");
  if (device == "cpu") return exec::Device::kCpu;
  if (device != "cuda") throw UsageError(fmt::format("--device: expected cpu or cuda, got '{}'", device));
  if (!exec::built_with_cuda())
    throw UsageError("--device cuda: this moesim was built without CUDA (configure with nvcc available, "
                     "-DMOESIM_CUDA=ON)");
  const int devices = exec::cuda_device_count();
  if (devices == 0) throw UsageError("--device cuda: no CUDA device is visible on this machine");
  if (ranks > 1 && !exec::have_nccl())
    throw UsageError(fmt::format("--device cuda with {} ranks needs the NCCL engine, which is not in this build",
                                 ranks));
  // moesim's own mpirun launch puts every rank on this machine; a launch from outside may span nodes.
  if (ranks > devices && !exec::launched_by_mpi())
    throw UsageError(fmt::format("--device cuda: {} ranks need one GPU each, but this machine has {}", ranks, devices));
  return exec::Device::kCuda;
}

// OpenBLAS threads per CPU rank: --threads N; else what the device profile was calibrated with
// (so a prediction times the arithmetic it was measured on: a one-rank plan predicted from a
// two-rank calibration runs one thread, and no idle OpenBLAS worker spins beside the rank on a
// sibling hyperthread); else the machine's cores shared by the ranks on it.
inline int threads_per_rank(const Args& a, int ranks, int profile_threads = 0) {
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (a.has("--threads")) return a.get_int("--threads", 1, 1, 4096);
  if (profile_threads > 0) return profile_threads;
  int on_host = ranks;  // moesim's own launch puts every rank on this machine
  if (const char* local = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE")) on_host = std::max(1, std::atoi(local));
  return std::max(1, cores / std::max(1, on_host));
}

// Every problem found, as one usage error (exit 2, before any rank starts).
inline void refuse_if_any(const std::string& heading, const std::vector<std::string>& problems) {
  if (problems.empty()) return;
  std::string msg = heading;
  for (const std::string& p : problems) msg += "\n  " + p;
  throw UsageError(msg);
}

// Brings rank r's trace to rank 0 (serialized, carried in fp32 words) and merges them there.
inline trace::Trace gather_traces(const trace::Trace& mine, exec::Comm* world) {
  if (!world || world->size() == 1) return mine;
  std::vector<trace::Trace> parts;
  if (world->rank() == 0) parts.push_back(mine);
  for (int r = 1; r < world->size(); ++r) {
    if (world->rank() == r) {
      const std::string bytes = mine.SerializeAsString();
      float n = static_cast<float>(bytes.size());
      std::vector<float> words((bytes.size() + 3) / 4);
      std::memcpy(words.data(), bytes.data(), bytes.size());
      world->send(&n, 1, 0, r);
      world->send(words.data(), static_cast<int64_t>(words.size()), 0, r);
    } else if (world->rank() == 0) {
      float n = 0;
      world->recv(&n, 1, r, r);
      std::vector<float> words((static_cast<size_t>(n) + 3) / 4);
      world->recv(words.data(), static_cast<int64_t>(words.size()), r, r);
      trace::Trace t;
      if (!t.ParseFromArray(words.data(), static_cast<int>(n))) throw exec::Error(fmt::format("rank {}: trace garbled", r));
      parts.push_back(std::move(t));
    }
  }
  return world->rank() == 0 ? trace::merge(parts) : mine;
}

// The node each rank runs on: its host name (MOESIM_NODE_NAME instead, when set: containers that
// share a host can name their nodes), told apart by a 48-bit hash carried in three exact fp32
// words, nodes numbered by first appearance. Collective over `world` (nullptr: one rank).
struct RankNodes {
  std::vector<int> node_of_rank;  // by rank
  std::vector<int> ranks_of_node;  // by node
  std::string mine;                // this rank's node name
};
inline RankNodes rank_nodes(exec::Comm* world) {
  RankNodes out;
  if (const char* name = std::getenv("MOESIM_NODE_NAME")) {
    out.mine = name;
  } else {
    char host[256] = {};
    ::gethostname(host, sizeof(host) - 1);
    out.mine = host;
  }
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : out.mine) h = (h ^ c) * 1099511628211ull;
  const float mine[3] = {static_cast<float>(h & 0xffff), static_cast<float>((h >> 16) & 0xffff),
                         static_cast<float>((h >> 32) & 0xffff)};
  const int size = world ? world->size() : 1;
  std::vector<float> all(static_cast<size_t>(3 * size));
  if (world) world->all_gather(mine, all.data(), 3);
  else std::copy(mine, mine + 3, all.begin());
  std::vector<std::vector<float>> seen;
  for (int r = 0; r < size; ++r) {
    const std::vector<float> key(all.begin() + 3 * r, all.begin() + 3 * r + 3);
    const auto it = std::find(seen.begin(), seen.end(), key);
    out.node_of_rank.push_back(static_cast<int>(it - seen.begin()));
    if (it == seen.end()) {
      seen.push_back(key);
      out.ranks_of_node.push_back(0);
    }
    ++out.ranks_of_node[static_cast<size_t>(out.node_of_rank.back())];
  }
  return out;
}

// Runs body(world, host_world, backend) on every rank; an exec::Error on any rank ends all of them
// with its message. CPU ranks: an OpenBLAS back end with `threads` threads and one MPI world for both. CUDA ranks: device
// local_rank % devices, `world` the NCCL engine over device buffers and `host_world` MPI for host
// data (the trace gathering).
template <typename Body>
int on_ranks(int ranks, int threads, double timeout_s, exec::Device device, Body body) {
  std::unique_ptr<exec::Comm> host_world, device_world;
  try {
    if (ranks > 1) host_world = exec::make_mpi_comm(timeout_s);
    std::unique_ptr<exec::Backend> backend;
    if (device == exec::Device::kCuda) {
      const int devices = exec::cuda_device_count();
      if (devices == 0) throw exec::Error("no CUDA device is visible to this rank");
      backend = exec::make_cuda_backend(exec::local_rank() % devices);
      if (ranks > 1) device_world = exec::make_nccl_comm(timeout_s);
    } else {
      backend = exec::make_cpu_backend(threads);
    }
    exec::Comm* world = device_world ? device_world.get() : host_world.get();
    return body(world, host_world.get(), *backend);
  } catch (const exec::Error& e) {
    if (ranks > 1) exec::abort_all(e.what());
    std::cerr << "moesim: " << e.what() << '\n';
    return kExitInternal;
  }
}

// A DP x EP strategy's knobs for the executor: its ep, capacity factor and drop policy. Throws
// UsageError naming `file` when it has tensor or pipeline parallelism or its dp is not `ranks`.
inline void apply_strategy(const strategy::Strategy& s, const std::string& file, int ranks, exec::TrainOptions& o) {
  if (s.tp() != 1 || s.pp() != 1)
    throw UsageError(fmt::format("{}: the executor runs data and expert parallelism (tp 1, pp 1) for now", file));
  if (s.dp() != ranks) throw UsageError(fmt::format("{}: dp {} but {} ranks: give --ranks {}", file, s.dp(), ranks, s.dp()));
  o.ep = s.ep();
  o.capacity_factor = s.capacity_factor();
  o.routing = s.drop_policy() == strategy::BATCH_PRIORITY ? exec::RoutingPolicy::kBatchPriority
              : s.drop_policy() == strategy::NO_DROP     ? exec::RoutingPolicy::kNoDrop
                                                          : exec::RoutingPolicy::kVanilla;
}

}  // namespace moesim::cli
