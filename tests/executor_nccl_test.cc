// The NCCL engine against its CPU reference, the MPI engine: the same exact-by-construction
// exchanges (small integers, exact in fp32) through both, compared bit for bit. Run by CTest
// under mpirun on 1 and 2 ranks. Without one GPU per rank the MPI half still runs and every rank
// exits 77 (CTest "Skipped") with the reason on stdout.
#include "executor/comm.h"
#include "executor/error.h"

#include <cuda_runtime.h>
#include <fmt/format.h>
#include <mpi.h>

#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <vector>

using namespace moesim;

namespace {

constexpr int kSkipped = 77;
constexpr double kTimeout_s = 60;

void cuda_check(cudaError_t rc, const char* what) {
  if (rc != cudaSuccess) throw exec::Error(fmt::format("{}: {}", what, cudaGetErrorString(rc)));
}

// Runs `op(in, out)` with `in` and `out` in host memory or on the device; returns `out`.
// `out` starts as a copy of `out_init` (for in-place calls).
using Op = std::function<void(const float* in, float* out)>;
std::vector<float> run(bool device, const std::vector<float>& in, const std::vector<float>& out_init, const Op& op) {
  std::vector<float> out = out_init;
  if (!device) {
    op(in.data(), out.data());
    return out;
  }
  float *d_in = nullptr, *d_out = nullptr;
  cuda_check(cudaMalloc(&d_in, in.size() * sizeof(float) + 4), "cudaMalloc");
  cuda_check(cudaMalloc(&d_out, out.size() * sizeof(float) + 4), "cudaMalloc");
  cuda_check(cudaMemcpy(d_in, in.data(), in.size() * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
  cuda_check(cudaMemcpy(d_out, out.data(), out.size() * sizeof(float), cudaMemcpyHostToDevice), "cudaMemcpy");
  op(d_in, d_out);
  cuda_check(cudaMemcpy(out.data(), d_out, out.size() * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy");
  cudaFree(d_in);
  cudaFree(d_out);
  return out;
}

float element(int src, int dst, int64_t i) { return static_cast<float>(src * 100000 + dst * 10000 + i); }
int64_t count(int s, int d) { return (s * 5 + d * 3 + 1) % 7 + (s == d ? 0 : 100); }

// Every exchange of comm_test, through `comm` on host (MPI) or device (NCCL) buffers: the
// results, in order, to be compared between the engines.
std::vector<std::vector<float>> exchanges(exec::Comm& comm, bool device) {
  const int me = comm.rank(), n = comm.size();
  std::vector<std::vector<float>> results;

  std::vector<int64_t> send_counts(static_cast<size_t>(n)), recv_counts(static_cast<size_t>(n));
  std::vector<float> send;
  int64_t recv_total = 0;
  for (int r = 0; r < n; ++r) {
    send_counts[static_cast<size_t>(r)] = count(me, r);
    recv_counts[static_cast<size_t>(r)] = count(r, me);
    recv_total += count(r, me);
    for (int64_t i = 0; i < count(me, r); ++i) send.push_back(element(me, r, i));
  }
  std::vector<int64_t> told;
  comm.all_to_all_counts(send_counts, told);
  results.emplace_back(told.begin(), told.end());
  results.push_back(run(device, send, std::vector<float>(static_cast<size_t>(recv_total), -1.0f),
                        [&](const float* in, float* out) { comm.all_to_all_v(in, send_counts, out, recv_counts); }));

  const int64_t m = 1000;
  std::vector<float> values(m);
  for (int64_t i = 0; i < m; ++i) values[static_cast<size_t>(i)] = static_cast<float>((me + 1) * (i % 13) - i % 5);
  results.push_back(run(device, values, values, [&](const float*, float* out) { comm.all_reduce_sum(out, m); }));
  results.push_back(run(device, values, std::vector<float>(static_cast<size_t>(m * n), -1.0f),
                        [&](const float* in, float* out) { comm.all_gather(in, out, m); }));
  std::vector<float> blocks(static_cast<size_t>(m * n));
  for (size_t j = 0; j < blocks.size(); ++j) blocks[j] = static_cast<float>((me + 1) * static_cast<int64_t>(j));
  results.push_back(run(device, blocks, std::vector<float>(static_cast<size_t>(m), -1.0f),
                        [&](const float* in, float* out) { comm.reduce_scatter_sum(in, out, m); }));

  if (n >= 2) {  // a ring: rank 0 starts it, the others pass it on
    const int next = (me + 1) % n, prev = (me + n - 1) % n;
    results.push_back(run(device, values, std::vector<float>(static_cast<size_t>(m), -1.0f),
                          [&](const float* in, float* out) {
                            if (me == 0) {
                              comm.send(in, m, next, 3);
                              comm.recv(out, m, prev, 3);
                            } else {
                              comm.recv(out, m, prev, 3);
                              comm.send(in, m, next, 3);
                            }
                          }));
  }

  auto reversed = comm.split(0, n - me);
  results.push_back({static_cast<float>(reversed->rank()), static_cast<float>(reversed->size())});
  results.push_back(run(device, values, std::vector<float>(static_cast<size_t>(m * n), -1.0f),
                        [&](const float* in, float* out) { reversed->all_gather(in, out, m); }));
  comm.barrier();
  return results;
}

}  // namespace

int main() {
  try {
    auto mpi = exec::make_mpi_comm(kTimeout_s);
    const int me = mpi->rank();
    const std::vector<std::vector<float>> reference = exchanges(*mpi, false);

    // One GPU per rank of this node, agreed by all ranks so that they skip together.
    MPI_Comm node = MPI_COMM_NULL;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, me, MPI_INFO_NULL, &node);
    int node_size = 0, devices = 0;
    MPI_Comm_size(node, &node_size);
    MPI_Comm_free(&node);
    const cudaError_t rc = cudaGetDeviceCount(&devices);
    int ok = rc == cudaSuccess && devices >= node_size, all_ok = 0;
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
    if (!exec::have_nccl() || !all_ok) {
      std::printf("SKIPPED: rank %d: %d rank(s) on this node, %s; the MPI reference ran (%zu exchanges)\n", me,
                  node_size, rc != cudaSuccess ? cudaGetErrorString(rc) : fmt::format("{} GPU(s)", devices).c_str(),
                  reference.size());
      return kSkipped;
    }

    auto nccl = exec::make_nccl_comm(kTimeout_s);
    if (nccl->rank() != me || nccl->size() != mpi->size()) throw exec::Error("NCCL and MPI ranks differ");
    const std::vector<std::vector<float>> got = exchanges(*nccl, true);
    int failures = 0;
    for (size_t k = 0; k < reference.size(); ++k) {
      if (got[k] == reference[k]) continue;
      ++failures;
      std::printf("FAILED: rank %d: exchange %zu differs from the MPI reference\n", me, k);
    }
    if (failures == 0)
      std::printf("PASSED: rank %d: %zu exchanges through NCCL match MPI bit for bit\n", me, reference.size());
    return failures == 0 ? 0 : 1;
  } catch (const std::exception& e) {
    std::printf("FAILED: %s\n", e.what());
    return 1;
  }
}
