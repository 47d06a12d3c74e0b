// The NCCL engine of exec::Comm (comm.h): device buffers, one GPU per rank, bootstrapped over
// MPI. Host code only (NCCL launches its own kernels); part of the CUDA module (cuda_module.h)
// in CUDA builds that find NCCL.
#include "executor/comm.h"
#include "executor/comm_checks.h"
#include "executor/cuda_module.h"

#include "executor/error.h"

#include <cuda_runtime.h>
#include <fmt/format.h>
#include <mpi.h>
#include <nccl.h>

#include <chrono>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace moesim::exec {
namespace {

using Clock = std::chrono::steady_clock;

int world_rank() {
  int initialized = 0, rank = -1;
  if (MPI_Initialized(&initialized) == MPI_SUCCESS && initialized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

[[noreturn]] void throw_call_error(std::string_view expression, const std::string& message, const char* file,
                                   int line) {
  throw Error(fmt::format("{}:{}: rank {}: {} failed: {}", file, line, world_rank(),
                          expression.substr(0, expression.find('(')), message));
}

std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return fmt::format("MPI error code {}", code);
  return std::string(text, static_cast<size_t>(length));
}

#define MOESIM_CUDA_CHECK(call)                                                                       \
  do {                                                                                                \
    const cudaError_t moesim_cuda_rc_ = (call);                                                       \
    if (moesim_cuda_rc_ != cudaSuccess)                                                               \
      throw_call_error(#call, cudaGetErrorString(moesim_cuda_rc_), __FILE__, __LINE__);               \
  } while (0)
#define MOESIM_NCCL_CHECK(call)                                                                       \
  do {                                                                                                \
    const ncclResult_t moesim_nccl_rc_ = (call);                                                      \
    if (moesim_nccl_rc_ != ncclSuccess)                                                               \
      throw_call_error(#call, ncclGetErrorString(moesim_nccl_rc_), __FILE__, __LINE__);               \
  } while (0)
#define MOESIM_MPI_CHECK(call)                                                                        \
  do {                                                                                                \
    const int moesim_mpi_rc_ = (call);                                                                \
    if (moesim_mpi_rc_ != MPI_SUCCESS) throw_call_error(#call, mpi_error_string(moesim_mpi_rc_), __FILE__, __LINE__); \
  } while (0)

class NcclComm final : public Comm {
 public:
  // Takes ownership of `comm`; `host` is an MPI Comm of the same ranks in the same order.
  NcclComm(ncclComm_t comm, std::unique_ptr<Comm> host, std::string name, double timeout_s, int device)
      : comm_(comm), host_(std::move(host)), name_(std::move(name)), timeout_s_(timeout_s), device_(device) {
    MOESIM_CUDA_CHECK(cudaSetDevice(device_));
    // A blocking stream: it waits for earlier work on the legacy default stream, where the CUDA
    // back end's kernels and Tensor copies that produce the buffers run (cuda_memory.h). A
    // non-blocking stream could start a collective before its input is written.
    MOESIM_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamDefault));
    MOESIM_NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
    MOESIM_NCCL_CHECK(ncclCommCount(comm_, &size_));
  }
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  ~NcclComm() override {
    if (comm_) {
      if (broken_.empty()) {
        ncclCommFinalize(comm_);
        ncclCommDestroy(comm_);
      } else {
        ncclCommAbort(comm_);
      }
    }
    if (stream_) cudaStreamDestroy(stream_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return name_; }
  Device buffer_device() const override { return Device::kCuda; }

  void all_to_all_v(const float* send, const std::vector<int64_t>& send_counts, float* recv,
                    const std::vector<int64_t>& recv_counts) override {
    constexpr std::string_view what = "all_to_all_v (ncclSend/ncclRecv)";
    const Clock::time_point deadline = start(what);
    check_counts(what, "send_counts", send_counts);
    check_counts(what, "recv_counts", recv_counts);
    const size_t me = static_cast<size_t>(rank_);
    if (send_counts[me] != recv_counts[me])
      usage_error(what, fmt::format("send_counts[{0}] = {1} but recv_counts[{0}] = {2} (this rank to itself)",
                                    rank_, send_counts[me], recv_counts[me]));
    int64_t send_offset = 0, recv_offset = 0, self_send = 0, self_recv = 0;
    MOESIM_NCCL_CHECK(ncclGroupStart());
    for (size_t r = 0; r < static_cast<size_t>(size_); ++r) {
      if (r == me) {
        self_send = send_offset;
        self_recv = recv_offset;
      } else {
        MOESIM_NCCL_CHECK(ncclSend(send + send_offset, static_cast<size_t>(send_counts[r]), ncclFloat,
                                   static_cast<int>(r), comm_, stream_));
        MOESIM_NCCL_CHECK(ncclRecv(recv + recv_offset, static_cast<size_t>(recv_counts[r]), ncclFloat,
                                   static_cast<int>(r), comm_, stream_));
      }
      send_offset += send_counts[r];
      recv_offset += recv_counts[r];
    }
    MOESIM_NCCL_CHECK(ncclGroupEnd());
    if (send_counts[me] > 0)
      MOESIM_CUDA_CHECK(cudaMemcpyAsync(recv + self_recv, send + self_send,
                                        static_cast<size_t>(send_counts[me]) * sizeof(float),
                                        cudaMemcpyDeviceToDevice, stream_));
    wait(what, deadline);
  }

  void all_reduce_sum(float* data, int64_t n) override {
    constexpr std::string_view what = "ncclAllReduce";
    const Clock::time_point deadline = start(what);
    check_count(what, "n", n);
    MOESIM_NCCL_CHECK(ncclAllReduce(data, data, static_cast<size_t>(n), ncclFloat, ncclSum, comm_, stream_));
    wait(what, deadline);
  }

  void all_gather(const float* send, float* recv, int64_t n_per_rank) override {
    constexpr std::string_view what = "ncclAllGather";
    const Clock::time_point deadline = start(what);
    check_count(what, "n_per_rank", n_per_rank);
    MOESIM_NCCL_CHECK(ncclAllGather(send, recv, static_cast<size_t>(n_per_rank), ncclFloat, comm_, stream_));
    wait(what, deadline);
  }

  void reduce_scatter_sum(const float* send, float* recv, int64_t n_per_rank) override {
    constexpr std::string_view what = "ncclReduceScatter";
    const Clock::time_point deadline = start(what);
    check_count(what, "n_per_rank", n_per_rank);
    MOESIM_NCCL_CHECK(
        ncclReduceScatter(send, recv, static_cast<size_t>(n_per_rank), ncclFloat, ncclSum, comm_, stream_));
    wait(what, deadline);
  }

  void send(const float* data, int64_t n, int peer, int tag) override {
    constexpr std::string_view what = "send (ncclSend)";
    const Clock::time_point deadline = start(what);
    check_count(what, "n", n);
    check_peer(what, peer, tag);
    MOESIM_NCCL_CHECK(ncclSend(data, static_cast<size_t>(n), ncclFloat, peer, comm_, stream_));
    wait(what, deadline);
  }

  void recv(float* data, int64_t n, int peer, int tag) override {
    constexpr std::string_view what = "recv (ncclRecv)";
    const Clock::time_point deadline = start(what);
    check_count(what, "n", n);
    check_peer(what, peer, tag);
    MOESIM_NCCL_CHECK(ncclRecv(data, static_cast<size_t>(n), ncclFloat, peer, comm_, stream_));
    wait(what, deadline);
  }

  void all_to_all_counts(const std::vector<int64_t>& send_counts, std::vector<int64_t>& recv_counts) override {
    start("all_to_all_counts");
    host_->all_to_all_counts(send_counts, recv_counts);
  }

  void barrier() override {
    const Clock::time_point deadline = start("barrier");
    wait("barrier (stream)", deadline);
    host_->barrier();
  }

  std::unique_ptr<Comm> split(int color, int key) const override {
    start("split (ncclCommSplit)");
    // The MPI side first: it checks the color and that every rank arrived, against the deadline.
    std::unique_ptr<Comm> host = host_->split(color, key);
    MOESIM_CUDA_CHECK(cudaSetDevice(device_));
    ncclComm_t group = nullptr;
    MOESIM_NCCL_CHECK(ncclCommSplit(comm_, color, key, &group, nullptr));
    return std::make_unique<NcclComm>(group, std::move(host), fmt::format("{}/color {}", name_, color), timeout_s_,
                                      device_);
  }

 private:
  Clock::time_point start(std::string_view what) const {
    if (!broken_.empty())
      throw Error(fmt::format("rank {}: {} on {}: the communicator is unusable after an earlier failure: {}",
                              world_rank(), what, name_, broken_));
    MOESIM_CUDA_CHECK(cudaSetDevice(device_));
    return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(timeout_s_));
  }
  detail::CallSite site(std::string_view what) const { return {std::to_string(world_rank()), name_, rank_, size_, what}; }
  [[noreturn]] void usage_error(std::string_view what, const std::string& message) const {
    site(what).usage_error(message);
  }
  void check_count(std::string_view what, std::string_view field, int64_t n) const { site(what).check_count(field, n); }
  void check_counts(std::string_view what, std::string_view field, const std::vector<int64_t>& counts) const {
    site(what).check_counts(field, counts);
  }
  void check_peer(std::string_view what, int peer, int tag) const { site(what).check_peer(peer, tag); }

  // Polls the stream and NCCL's asynchronous error until done or the deadline; a failure or a
  // timeout aborts the NCCL communicator (which frees its kernels) and leaves this Comm unusable.
  void wait(std::string_view what, Clock::time_point deadline) {
    for (;;) {
      const cudaError_t state = cudaStreamQuery(stream_);
      if (state == cudaSuccess) return;
      if (state != cudaErrorNotReady)
        fail(fmt::format("rank {}: {} on {}: cudaStreamQuery failed: {}", world_rank(), what, name_,
                         cudaGetErrorString(state)));
      ncclResult_t async = ncclSuccess;
      const ncclResult_t rc = ncclCommGetAsyncError(comm_, &async);
      if (rc != ncclSuccess || (async != ncclSuccess && async != ncclInProgress))
        fail(fmt::format("rank {}: {} on {} failed: {} ({})", world_rank(), what, name_,
                         ncclGetErrorString(rc != ncclSuccess ? rc : async), ncclGetLastError(comm_)));
      if (Clock::now() >= deadline)
        fail(fmt::format("rank {}: {} on {} did not complete within {:g} s (a peer died or hangs?)", world_rank(),
                         what, name_, timeout_s_));
    }
  }
  [[noreturn]] void fail(const std::string& message) {
    broken_ = message;
    ncclCommAbort(comm_);
    comm_ = nullptr;
    throw Error(message);
  }

  ncclComm_t comm_ = nullptr;
  std::unique_ptr<Comm> host_;
  std::string name_;
  double timeout_s_;
  int device_;
  cudaStream_t stream_ = nullptr;
  int rank_ = 0;
  int size_ = 0;
  std::string broken_;
};

}  // namespace

namespace cuda {

// `host` is an MPI Comm of MPI_COMM_WORLD (MPI initialised).
std::unique_ptr<Comm> make_nccl_comm(std::unique_ptr<Comm> host, double timeout_s) {
  const int rank = host->rank(), size = host->size();

  // The node-local rank picks the device; every rank must have one of its own.
  MPI_Comm node = MPI_COMM_NULL;
  MOESIM_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node));
  int node_rank = 0, node_size = 0;
  MOESIM_MPI_CHECK(MPI_Comm_rank(node, &node_rank));
  MOESIM_MPI_CHECK(MPI_Comm_size(node, &node_size));
  MOESIM_MPI_CHECK(MPI_Comm_free(&node));
  int devices = 0;
  const cudaError_t count_rc = cudaGetDeviceCount(&devices);
  if (count_rc != cudaSuccess) devices = 0;
  // Agree first, so that every rank throws rather than some waiting for the others forever.
  int ok = node_size <= devices, all_ok = 0;
  MOESIM_MPI_CHECK(MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD));
  if (!all_ok) {
    const std::string found = count_rc != cudaSuccess ? std::string(cudaGetErrorString(count_rc))
                                                      : fmt::format("{} device(s)", devices);
    throw Error(fmt::format("rank {}: the NCCL engine needs one GPU per rank: this node runs {} rank(s), CUDA reports "
                            "{}{}",
                            rank, node_size, found, ok ? " (another node lacks GPUs)" : ""));
  }
  MOESIM_CUDA_CHECK(cudaSetDevice(node_rank));

  ncclUniqueId id{};
  if (rank == 0) MOESIM_NCCL_CHECK(ncclGetUniqueId(&id));
  MOESIM_MPI_CHECK(MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD));
  ncclComm_t comm = nullptr;
  MOESIM_NCCL_CHECK(ncclCommInitRank(&comm, size, id, rank));
  return std::make_unique<NcclComm>(comm, std::move(host), "nccl world", timeout_s, node_rank);
}

}  // namespace cuda

}  // namespace moesim::exec
