// Communication benchmark: all_to_all_v through exec::Comm (MPI engine) against raw
// MPI_Alltoallv on the same buffers, side by side in one run (the machine is noisy).
//   mpirun --allow-run-as-root --oversubscribe -np 2 build/bench/comm_bench [--quick]
// (--allow-run-as-root only where ranks run as root, as in our containers.)
// Target: ours at >= 90% of raw MPI's speed (t_raw / t_ours >= 0.90) at every size.
//
// Sizes are bytes sent per rank, split evenly over the ranks (itself included), 1 KiB .. 64 MiB.
// Ours and raw alternate call by call (which goes first alternates too), each call timed alone,
// so that the noise of a shared machine falls on both alike; a time is the median call on the
// slowest rank. Bandwidths as nccl-tests reports alltoall:
//   algBw = S / t            (S = bytes sent per rank)
//   busBw = algBw * (n-1)/n  (the share of S that crosses the network; n ranks)
#include "executor/comm.h"
#include "executor/error.h"

#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

using namespace moesim;

namespace {

struct Timing {
  double raw_s = 0;
  double ours_s = 0;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// `calls` of each, alternating; the median call of each on the slowest rank.
template <typename Raw, typename Ours>
Timing time_side_by_side(int calls, Raw&& raw, Ours&& ours) {
  std::vector<double> raw_s, ours_s;
  MPI_Barrier(MPI_COMM_WORLD);
  for (int i = 0; i < calls; ++i) {
    for (int k = 0; k < 2; ++k) {
      const bool raw_now = (i + k) % 2 == 0;
      const double t0 = MPI_Wtime();
      if (raw_now) raw(); else ours();
      (raw_now ? raw_s : ours_s).push_back(MPI_Wtime() - t0);
    }
  }
  double mine[2] = {median(raw_s), median(ours_s)}, slowest[2] = {0, 0};
  MPI_Allreduce(mine, slowest, 2, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return {slowest[0], slowest[1]};
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;  // up to 1 MiB, ~50 ms per size: a smoke run
    } else {
      std::fprintf(stderr, "usage: mpirun -np N comm_bench [--quick]\n");
      return std::strcmp(argv[i], "--help") == 0 ? 0 : 2;
    }
  }
  try {
    auto comm = exec::make_mpi_comm(120);  // initialises MPI; the raw calls below use MPI_COMM_WORLD
    const int n = comm->size(), me = comm->rank();
    const size_t max_bytes = quick ? (size_t{1} << 20) : (size_t{64} << 20);
    const double bus_factor = static_cast<double>(n - 1) / n;
    if (me == 0) {
      fmt::print("all_to_all_v, {} ranks, fp32, even counts; median call of the slowest rank, alternating\n", n);
      fmt::print("bandwidths in GB/s: algBw = S/t, busBw = algBw * (n-1)/n = algBw * {:.3f} (nccl-tests alltoall); S = bytes per rank\n",
                 bus_factor);
      fmt::print("{:>10} | {:^30} | {:^30} | {:>9}\n", "", "raw MPI_Alltoallv", "moesim all_to_all_v", "ours/raw");
      fmt::print("{:>10} | {:>10} {:>9} {:>9} | {:>10} {:>9} {:>9} | {:>9}\n", "S (bytes)", "time (us)", "algBw", "busBw",
                 "time (us)", "algBw", "busBw", "speed");
    }
    bool all_ok = true;
    for (size_t bytes = 1024; bytes <= max_bytes; bytes *= 4) {
      const int per_peer = static_cast<int>(bytes / sizeof(float) / static_cast<size_t>(n));
      const size_t total = static_cast<size_t>(per_peer) * static_cast<size_t>(n);
      std::vector<float> send(total), recv_raw(total), recv_ours(total);
      for (size_t i = 0; i < total; ++i) send[i] = static_cast<float>((me * 7919 + static_cast<int>(i)) % 65536);
      const std::vector<int64_t> counts(static_cast<size_t>(n), per_peer);
      std::vector<int> counts_int(static_cast<size_t>(n), per_peer), displs(static_cast<size_t>(n));
      for (int r = 0; r < n; ++r) displs[static_cast<size_t>(r)] = r * per_peer;

      auto raw = [&] {
        MPI_Alltoallv(send.data(), counts_int.data(), displs.data(), MPI_FLOAT, recv_raw.data(), counts_int.data(),
                      displs.data(), MPI_FLOAT, MPI_COMM_WORLD);
      };
      auto ours = [&] { comm->all_to_all_v(send.data(), counts, recv_ours.data(), counts); };
      // Warm up both and check they agree bit for bit; then ~0.5 s of calls (at least 21 of each).
      raw();
      ours();
      int same = recv_raw == recv_ours, all_same = 0;
      MPI_Allreduce(&same, &all_same, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
      if (!all_same) throw exec::Error(fmt::format("all_to_all_v and MPI_Alltoallv disagree at {} bytes", bytes));
      const Timing probe = time_side_by_side(3, raw, ours);
      const double budget_s = quick ? 0.05 : 0.5;
      double calls_d = budget_s / (probe.raw_s + probe.ours_s);
      MPI_Allreduce(MPI_IN_PLACE, &calls_d, 1, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);  // the same on every rank
      const int calls = std::clamp(static_cast<int>(calls_d), 21, 100000);
      const Timing t = time_side_by_side(calls, raw, ours);
      const double S = static_cast<double>(total * sizeof(float));
      const double speed = t.raw_s / t.ours_s;
      all_ok = all_ok && speed >= 0.9;
      if (me == 0)
        fmt::print("{:>10} | {:>10.2f} {:>9.3f} {:>9.3f} | {:>10.2f} {:>9.3f} {:>9.3f} | {:>8.2f}{}\n",
                   total * sizeof(float), t.raw_s * 1e6, S / t.raw_s / 1e9, S / t.raw_s / 1e9 * bus_factor,
                   t.ours_s * 1e6, S / t.ours_s / 1e9, S / t.ours_s / 1e9 * bus_factor, speed,
                   speed >= 0.9 ? "" : "  < 0.90");
    }
    if (me == 0) fmt::print("target ours/raw >= 0.90 at every size: {}\n", all_ok ? "met" : "NOT met");
  } catch (const exec::Error& e) {
    exec::abort_all(e.what());
  }
  return 0;
}
