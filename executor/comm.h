// Communication between ranks: one interface, two engines: MPI over CPU buffers and NCCL over
// device buffers (bootstrapped over MPI). Layers call it through this seam only.
//
//   auto world = exec::make_mpi_comm(timeout_s);   // a private copy of MPI_COMM_WORLD
//   auto ep = world->split(color, key);            // a sub-group (EP, DP, TP)
//   ep->all_to_all_v(send, send_counts, recv, recv_counts);
//
// Counts and displacements are in elements of fp32 (int64: counts above MPI's INT_MAX are split
// into several messages). Buffers of one call must not overlap, except where a call says so.
//
// Collective calls (every method but send/recv, and make_mpi_comm and split themselves) must be
// made by every rank of the group, in the same order, with matching sizes. One thread at a time
// per process calls MPI (MPI_THREAD_SERIALIZED).
//
// Errors from MPI/NCCL surface as exec::Error naming file:line, the rank, the call and the
// library's message. A rank that dies or hangs makes the others fail within `timeout_s` (every
// call is started non-blocking and polled against one deadline per call), not hang forever:
//   "rank 0: MPI_Iallreduce on mpi world did not complete within 60 s (a peer died or hangs?)".
// After such a timeout the Comm is unusable (its later calls throw at once): the abandoned
// operation may still match a late peer, so the program should end, on every rank, through
// abort_all(). A recv that times out is the one exception: it is cancelled and the Comm stays
// usable.
#pragma once

#include "executor/tensor.h"

#include <climits>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moesim::exec {

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string name() const = 0;  // "mpi world", "mpi world/color 1"
  // Where this engine's buffers live: kCpu for MPI, kCuda for NCCL. Layers hand it buffers of their
  // back end's device, and stage host data through all_reduce_sum_host / all_gather_host below.
  virtual Device buffer_device() const { return Device::kCpu; }

  // Every rank sends send_counts[r] elements to rank r, packed in rank order in `send`, and
  // receives recv_counts[r] from rank r packed in rank order in `recv`. Zero counts are fine;
  // recv_counts[r] must equal rank r's send_counts[rank()] (all_to_all_counts tells it).
  virtual void all_to_all_v(const float* send, const std::vector<int64_t>& send_counts, float* recv,
                            const std::vector<int64_t>& recv_counts) = 0;
  virtual void all_reduce_sum(float* data, int64_t n) = 0;            // in place
  // recv[r*n_per_rank ..] = rank r's send[0 .. n_per_rank); `send` may be recv + rank()*n_per_rank.
  virtual void all_gather(const float* send, float* recv, int64_t n_per_rank) = 0;
  // recv[i] = sum over ranks r of rank r's send[rank()*n_per_rank + i], i < n_per_rank.
  virtual void reduce_scatter_sum(const float* send, float* recv, int64_t n_per_rank) = 0;
  // Point to point; tag in [0, 32767) (MPI guarantees at least that range). Messages between the
  // same pair with the same tag arrive in order. recv of n elements requires a send of exactly n.
  virtual void send(const float* data, int64_t n, int peer, int tag) = 0;
  virtual void recv(float* data, int64_t n, int peer, int tag) = 0;
  // recv_counts[r] = rank r's send_counts[rank()] (recv_counts is resized to size()).
  virtual void all_to_all_counts(const std::vector<int64_t>& send_counts, std::vector<int64_t>& recv_counts) = 0;
  virtual void barrier() = 0;

  // Ranks with the same color (>= 0) form a group, ordered by key (ties: by rank here). The new
  // group inherits the timeout. Collective over this Comm.
  virtual std::unique_ptr<Comm> split(int color, int key) const = 0;
};

struct MpiCommOptions {
  double timeout_s = 60;  // deadline of each call, from its start to its completion on this rank
  // Largest element count in one MPI message or collective; bigger transfers are split into
  // pieces of at most this many elements. INT_MAX is MPI's own limit (counts are int); tests
  // lower it to exercise the split path on small buffers. Must be equal on every rank.
  int64_t max_message_elements = INT_MAX;
};

// A Comm over a private duplicate of MPI_COMM_WORLD (MPI_Comm_idup): each call gives an isolated
// context, so two Comms never match each other's messages. MPI is initialised on the first call
// (MPI_Init_thread, shared by all later calls) and finalised at process exit. Collective over
// MPI_COMM_WORLD.
std::unique_ptr<Comm> make_mpi_comm(double timeout_s = 60);
std::unique_ptr<Comm> make_mpi_comm(const MpiCommOptions& options);
// True when this process was started by mpirun/srun (or MPI is initialised).
bool launched_by_mpi();

// The NCCL engine: the same calls over device (CUDA) buffers, on MPI_COMM_WORLD's ranks, one GPU
// per rank (the node-local rank's device). Bootstrapped over MPI: rank 0 makes the NCCL unique id
// and MPI_Bcast hands it on. all_to_all_counts (host data) and barrier go over an MPI Comm of the
// same ranks. Each call is enqueued on the Comm's own stream and waited for, polled against the
// deadline; a failure or timeout aborts the NCCL communicator. Differences from the MPI engine:
// send/recv match in call order per pair (NCCL has no tags; the tag is only checked), and
// mismatched counts are not detected. Builds without NCCL throw exec::Error from
// make_nccl_comm and answer false from have_nccl().
std::unique_ptr<Comm> make_nccl_comm(double timeout_s = 60);
bool have_nccl();

// Collectives over host data on any engine: direct for a CPU engine, else staged through a buffer
// on the engine's device (small metadata: token counts, routing decisions, losses).
void all_reduce_sum_host(Comm& comm, float* data, int64_t n);
void all_gather_host(Comm& comm, const float* send, float* recv, int64_t n_per_rank);

// This process's rank among the ranks of its node: OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID,
// SLURM_LOCALID, else (MPI initialised) a shared-memory split of MPI_COMM_WORLD, else 0. A rank
// takes CUDA device local_rank() % device count.
int local_rank();

// For the CLI, after an exec::Error from a Comm: prints "moesim: aborting all ranks: <why>" to
// stderr and ends every rank of the job (MPI_Abort on MPI_COMM_WORLD, exit code 1); without MPI
// initialised, ends this process with exit code 1. The library itself never calls it.
[[noreturn]] void abort_all(const std::string& why);

}  // namespace moesim::exec
