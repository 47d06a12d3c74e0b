#include "executor/comm.h"
#include "executor/comm_checks.h"

#include "executor/error.h"

#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string_view>
#include <utility>

namespace moesim::exec {
namespace {

using Clock = std::chrono::steady_clock;

// Tags 0..32766 belong to send/recv; all_to_all_v's messages use the last one MPI guarantees
// (MPI_TAG_UB >= 32767), so the two never match each other.
constexpr int kAllToAllTag = detail::kMaxUserTag;

int g_world_rank = -1;  // known once MPI is initialised; error messages name it

std::string rank_label() { return g_world_rank >= 0 ? std::to_string(g_world_rank) : std::string("?"); }

std::string mpi_error_string(int code) {
  char text[MPI_MAX_ERROR_STRING];
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) return fmt::format("MPI error code {}", code);
  return std::string(text, static_cast<size_t>(length));
}

// "MPI_Isend(data + off, ...)" -> "MPI_Isend".
std::string_view call_name(std::string_view expression) { return expression.substr(0, expression.find('(')); }

[[noreturn]] void throw_mpi_error(int code, std::string_view expression, const char* file, int line) {
  throw Error(fmt::format("{}:{}: rank {}: {} failed: {}", file, line, rank_label(), call_name(expression),
                          mpi_error_string(code)));
}

// Every MPI call goes through this (the communicators have MPI_ERRORS_RETURN set).
#define MOESIM_MPI_CHECK(call)                                                           \
  do {                                                                                   \
    const int moesim_mpi_rc_ = (call);                                                   \
    if (moesim_mpi_rc_ != MPI_SUCCESS) throw_mpi_error(moesim_mpi_rc_, #call, __FILE__, __LINE__); \
  } while (0)

// MPI, initialised once per process by the first make_mpi_comm and finalised at exit (when this
// function-local static is destroyed). If someone else initialised MPI, they finalise it.
class MpiRuntime {
 public:
  static MpiRuntime& instance() {
    static MpiRuntime runtime;
    return runtime;
  }
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  ~MpiRuntime() {
    int finalized = 1;
    if (owns_ && MPI_Finalized(&finalized) == MPI_SUCCESS && !finalized) MPI_Finalize();
  }

 private:
  MpiRuntime() {
    int initialized = 0;
    MOESIM_MPI_CHECK(MPI_Initialized(&initialized));
    if (!initialized) {
      // Open MPI's shared-memory transport copies messages past its eager size with one
      // process_vm_readv (CMA) from the peer's pages. Inside a training step, on buffers whose
      // pages the kernel has not walked lately, that made every exchange 3x slower than copying
      // through the shared segment (moe-tiny's 64 KB all-to-alls: 25-75 us against 7-14 us; the
      // gradient all-reduces likewise) and it is what the model cannot know: the copy-through
      // transport runs at the memory's pace. A user's own setting of it is kept.
      for (const char* name : {"OMPI_MCA_btl_vader_single_copy_mechanism", "OMPI_MCA_btl_sm_single_copy_mechanism"})
        ::setenv(name, "none", /*overwrite=*/0);
      int provided = 0;
      MOESIM_MPI_CHECK(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided));
      owns_ = true;
    } else {
      int finalized = 0;
      MOESIM_MPI_CHECK(MPI_Finalized(&finalized));
      if (finalized) throw Error("MPI was already finalised: no communicator can be made any more");
    }
    int provided = 0;
    MOESIM_MPI_CHECK(MPI_Query_thread(&provided));
    if (provided < MPI_THREAD_SERIALIZED)
      throw Error(fmt::format("MPI provides thread level {}, moesim needs MPI_THREAD_SERIALIZED ({})", provided,
                              MPI_THREAD_SERIALIZED));
    // Errors come back as codes and become exec::Error; duplicates and splits inherit this.
    MOESIM_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
    MOESIM_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &g_world_rank));
  }

  bool owns_ = false;
};

std::string timeout_message(std::string_view what, std::string_view comm_name, double timeout_s) {
  return fmt::format("rank {}: {} on {} did not complete within {:g} s (a peer died or hangs?)", rank_label(), what,
                     comm_name, timeout_s);
}

enum class Outcome { kDone, kTimedOut };

// Polls `requests` until all completed or `deadline` passed. MPI errors throw (naming `what`).
// It spins like MPI_Wait does: MPI's progress engine itself yields the core when ranks outnumber
// cores (Open MPI's mpi_yield_when_idle), so a yield here would only slow the common case.
Outcome poll(std::vector<MPI_Request>& requests, std::vector<MPI_Status>& statuses, Clock::time_point deadline,
             std::string_view what) {
  statuses.resize(requests.size());
  const int n = static_cast<int>(requests.size());
  for (;;) {
    int done = 0;
    const int rc = MPI_Testall(n, requests.data(), &done, statuses.data());
    if (rc != MPI_SUCCESS) {
      int code = rc;
      if (rc == MPI_ERR_IN_STATUS)
        for (const MPI_Status& s : statuses)
          if (s.MPI_ERROR != MPI_SUCCESS && s.MPI_ERROR != MPI_ERR_PENDING) {
            code = s.MPI_ERROR;
            break;
          }
      throw Error(fmt::format("{}:{}: rank {}: MPI_Testall ({}) failed: {}", __FILE__, __LINE__, rank_label(), what,
                              mpi_error_string(code)));
    }
    if (done) return Outcome::kDone;
    if (Clock::now() >= deadline) return Outcome::kTimedOut;
  }
}

Clock::time_point deadline_after(double timeout_s) {
  constexpr double kForever_s = 1e8;  // ~3 years: keeps the conversion to clock ticks from overflowing
  return Clock::now() +
         std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(std::min(timeout_s, kForever_s)));
}

void validate_options(const MpiCommOptions& o) {
  if (!(o.timeout_s > 0) || !std::isfinite(o.timeout_s))
    throw Error(fmt::format("MPI communicator: timeout_s must be a positive number of seconds, got {}", o.timeout_s));
  if (o.max_message_elements < 1 || o.max_message_elements > INT_MAX)
    throw Error(fmt::format("MPI communicator: max_message_elements must be in [1, {}], got {}", INT_MAX,
                            o.max_message_elements));
}

class MpiComm final : public Comm {
 public:
  MpiComm(MPI_Comm comm, std::string name, const MpiCommOptions& options)
      : comm_(comm), name_(std::move(name)), options_(options) {
    MOESIM_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
    MOESIM_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
    MOESIM_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  }
  MpiComm(const MpiComm&) = delete;
  MpiComm& operator=(const MpiComm&) = delete;

  ~MpiComm() override {
    // After a timeout an abandoned operation may still use the communicator: leave it be.
    int finalized = 1;
    if (broken_.empty() && MPI_Finalized(&finalized) == MPI_SUCCESS && !finalized) MPI_Comm_free(&comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string name() const override { return name_; }

  void all_to_all_v(const float* send, const std::vector<int64_t>& send_counts, float* recv,
                    const std::vector<int64_t>& recv_counts) override;
  void all_reduce_sum(float* data, int64_t n) override;
  void all_gather(const float* send, float* recv, int64_t n_per_rank) override;
  void reduce_scatter_sum(const float* send, float* recv, int64_t n_per_rank) override;
  void send(const float* data, int64_t n, int peer, int tag) override;
  void recv(float* data, int64_t n, int peer, int tag) override;
  void all_to_all_counts(const std::vector<int64_t>& send_counts, std::vector<int64_t>& recv_counts) override;
  void barrier() override;
  std::unique_ptr<Comm> split(int color, int key) const override;

 private:
  // What a later call is told after this one failed; a failed Comm refuses all further calls.
  void check_usable(std::string_view what) const {
    if (!broken_.empty())
      throw Error(fmt::format("rank {}: {} on {}: the communicator is unusable after an earlier failure: {}",
                              rank_label(), what, name_, broken_));
  }
  [[noreturn]] void fail(const std::string& message) const {
    broken_ = message;
    throw Error(message);
  }
  detail::CallSite site(std::string_view what) const { return {rank_label(), name_, rank_, size_, what}; }
  [[noreturn]] void usage_error(std::string_view what, const std::string& message) const {
    site(what).usage_error(message);
  }
  void check_count(std::string_view what, std::string_view field, int64_t n) const { site(what).check_count(field, n); }
  void check_counts(std::string_view what, std::string_view field, const std::vector<int64_t>& counts) const {
    site(what).check_counts(field, counts);
  }
  void check_peer(std::string_view what, int peer, int tag) const { site(what).check_peer(peer, tag); }

  // Pieces of at most max_message_elements; always at least one (an empty one for n == 0), so
  // both sides of a pair post the same number of messages and a count mismatch is caught.
  template <typename Fn>
  void for_each_piece(int64_t n, Fn&& fn) const {
    const int64_t piece = options_.max_message_elements;
    int64_t offset = 0;
    do {
      const int64_t count = std::min(piece, n - offset);
      fn(offset, static_cast<int>(count));
      offset += count;
    } while (offset < n);
  }
  void post_sends(const float* data, int64_t n, int peer, int tag);
  // Records the expected count of each receive, checked on completion.
  void post_recvs(float* data, int64_t n, int peer, int tag);

  // Waits for requests_ until the call's deadline. On a timeout the Comm becomes unusable (the
  // requests are abandoned: collectives cannot be cancelled) and exec::Error is thrown.
  void complete(std::string_view what, Clock::time_point deadline);
  // For receives only: on a timeout they are cancelled and the Comm stays usable.
  void complete_receives(std::string_view what, Clock::time_point deadline);
  void check_received(std::string_view what) const;  // the counts that arrived, against expected_

  MPI_Comm comm_;
  std::string name_;
  MpiCommOptions options_;
  int rank_ = 0;
  int size_ = 0;
  mutable std::string broken_;  // why the Comm failed; empty while usable
  // Scratch of the call in flight, kept to avoid allocations per call.
  std::vector<MPI_Request> requests_;
  std::vector<MPI_Status> statuses_;
  struct ExpectedRecv {
    size_t request;  // index into requests_
    int peer;
    int count;
  };
  std::vector<ExpectedRecv> expected_;
  std::vector<int64_t> send_offset_, recv_offset_;  // all_to_all_v's displacements
};

void MpiComm::post_sends(const float* data, int64_t n, int peer, int tag) {
  for_each_piece(n, [&](int64_t offset, int count) {
    requests_.emplace_back();
    MOESIM_MPI_CHECK(MPI_Isend(data + offset, count, MPI_FLOAT, peer, tag, comm_, &requests_.back()));
  });
}

void MpiComm::post_recvs(float* data, int64_t n, int peer, int tag) {
  for_each_piece(n, [&](int64_t offset, int count) {
    expected_.push_back({requests_.size(), peer, count});
    requests_.emplace_back();
    MOESIM_MPI_CHECK(MPI_Irecv(data + offset, count, MPI_FLOAT, peer, tag, comm_, &requests_.back()));
  });
}

void MpiComm::complete(std::string_view what, Clock::time_point deadline) {
  Outcome outcome = Outcome::kDone;
  try {
    outcome = poll(requests_, statuses_, deadline, what);
  } catch (const Error& e) {
    fail(e.what());
  }
  if (outcome == Outcome::kTimedOut) fail(timeout_message(what, name_, options_.timeout_s));
}

void MpiComm::complete_receives(std::string_view what, Clock::time_point deadline) {
  Outcome outcome = Outcome::kDone;
  try {
    outcome = poll(requests_, statuses_, deadline, what);
  } catch (const Error& e) {
    fail(e.what());
  }
  if (outcome == Outcome::kDone) return;
  // Cancel what is still pending; a receive that matched meanwhile completes instead.
  for (MPI_Request& r : requests_)
    if (r != MPI_REQUEST_NULL) MOESIM_MPI_CHECK(MPI_Cancel(&r));
  try {
    outcome = poll(requests_, statuses_, deadline_after(options_.timeout_s), what);
  } catch (const Error& e) {
    fail(e.what());
  }
  if (outcome == Outcome::kTimedOut) fail(timeout_message(what, name_, options_.timeout_s) + " (cancel failed)");
  int cancelled = 0;
  for (const MPI_Status& s : statuses_) {
    int flag = 0;
    MOESIM_MPI_CHECK(MPI_Test_cancelled(&s, &flag));
    cancelled += flag;
  }
  if (cancelled == 0) return;  // everything arrived after all
  const std::string message = timeout_message(what, name_, options_.timeout_s);
  if (cancelled == static_cast<int>(statuses_.size())) throw Error(message);  // nothing consumed: still usable
  fail(message + " (part of the message was consumed)");
}

void MpiComm::check_received(std::string_view what) const {
  for (const ExpectedRecv& e : expected_) {
    int got = 0;
    MOESIM_MPI_CHECK(MPI_Get_count(&statuses_[e.request], MPI_FLOAT, &got));
    if (got != e.count)
      fail(fmt::format("rank {}: {} on {}: received {} elements from rank {} where {} were expected (the counts of "
                       "the two ranks disagree)",
                       rank_label(), what, name_, got, e.peer, e.count));
  }
}

void MpiComm::all_to_all_v(const float* send, const std::vector<int64_t>& send_counts, float* recv,
                           const std::vector<int64_t>& recv_counts) {
  constexpr std::string_view what = "all_to_all_v (MPI_Isend/MPI_Irecv)";
  check_usable(what);
  const Clock::time_point deadline = deadline_after(options_.timeout_s);
  check_counts(what, "send_counts", send_counts);
  check_counts(what, "recv_counts", recv_counts);
  const size_t me = static_cast<size_t>(rank_);
  if (send_counts[me] != recv_counts[me])
    usage_error(what, fmt::format("send_counts[{0}] = {1} but recv_counts[{0}] = {2} (this rank to itself)", rank_,
                                  send_counts[me], recv_counts[me]));
  send_offset_.resize(static_cast<size_t>(size_));
  recv_offset_.resize(static_cast<size_t>(size_));
  int64_t send_total = 0, recv_total = 0;
  for (size_t r = 0; r < static_cast<size_t>(size_); ++r) {
    send_offset_[r] = send_total;
    recv_offset_[r] = recv_total;
    send_total += send_counts[r];
    recv_total += recv_counts[r];
  }
  if ((send_total > 0 && !send) || (recv_total > 0 && !recv)) usage_error(what, "null buffer with non-zero counts");

  // Not MPI_Ialltoallv: its counts and displacements are int, and whether a call needs more would
  // have to be decided alike on every rank, which no rank can tell from its own counts. Instead a
  // pairwise exchange posted all at once (what Open MPI's alltoallv does for its basic
  // algorithm; as fast, see bench/comm_bench): counts above max_message_elements are split, and
  // both ranks of a pair split alike since they know the same count. Peers go in rotated order
  // so that no rank is everyone's first target.
  requests_.clear();
  expected_.clear();
  for (int k = 1; k < size_; ++k) {
    const size_t peer = static_cast<size_t>((rank_ - k + size_) % size_);
    post_recvs(recv + recv_offset_[peer], recv_counts[peer], static_cast<int>(peer), kAllToAllTag);
  }
  for (int k = 1; k < size_; ++k) {
    const size_t peer = static_cast<size_t>((rank_ + k) % size_);
    post_sends(send + send_offset_[peer], send_counts[peer], static_cast<int>(peer), kAllToAllTag);
  }
  if (send_counts[me] > 0)
    std::memcpy(recv + recv_offset_[me], send + send_offset_[me], static_cast<size_t>(send_counts[me]) * sizeof(float));
  complete(what, deadline);
  check_received(what);
}

void MpiComm::all_reduce_sum(float* data, int64_t n) {
  constexpr std::string_view what = "MPI_Iallreduce";
  check_usable(what);
  const Clock::time_point deadline = deadline_after(options_.timeout_s);
  check_count(what, "n", n);
  requests_.clear();
  for_each_piece(n, [&](int64_t offset, int count) {
    requests_.emplace_back();
    MOESIM_MPI_CHECK(
        MPI_Iallreduce(MPI_IN_PLACE, data + offset, count, MPI_FLOAT, MPI_SUM, comm_, &requests_.back()));
  });
  complete(what, deadline);
}

void MpiComm::all_gather(const float* send, float* recv, int64_t n_per_rank) {
  constexpr std::string_view what = "MPI_Iallgather";
  check_usable(what);
  const Clock::time_point deadline = deadline_after(options_.timeout_s);
  check_count(what, "n_per_rank", n_per_rank);
  const bool in_place = n_per_rank > 0 && send == recv + static_cast<int64_t>(rank_) * n_per_rank;
  requests_.clear();
  if (n_per_rank <= options_.max_message_elements) {
    requests_.emplace_back();
    MOESIM_MPI_CHECK(MPI_Iallgather(in_place ? MPI_IN_PLACE : send, static_cast<int>(n_per_rank), MPI_FLOAT, recv,
                                    static_cast<int>(n_per_rank), MPI_FLOAT, comm_, &requests_.back()));
  } else {
    // Piece [offset, offset + count) of every rank's block: one element of a type of `count`
    // floats whose extent is a whole block, so rank r's piece lands at recv + offset + r*n.
    for_each_piece(n_per_rank, [&](int64_t offset, int count) {
      MPI_Datatype piece = MPI_DATATYPE_NULL, strided = MPI_DATATYPE_NULL;
      MOESIM_MPI_CHECK(MPI_Type_contiguous(count, MPI_FLOAT, &piece));
      MOESIM_MPI_CHECK(MPI_Type_create_resized(piece, 0, static_cast<MPI_Aint>(n_per_rank) * sizeof(float), &strided));
      MOESIM_MPI_CHECK(MPI_Type_commit(&strided));
      requests_.emplace_back();
      MOESIM_MPI_CHECK(MPI_Iallgather(in_place ? MPI_IN_PLACE : send + offset, count, MPI_FLOAT, recv + offset, 1,
                                      strided, comm_, &requests_.back()));
      // Freeing only marks the types: the pending operation keeps using them.
      MOESIM_MPI_CHECK(MPI_Type_free(&strided));
      MOESIM_MPI_CHECK(MPI_Type_free(&piece));
    });
  }
  complete(what, deadline);
}

void MpiComm::reduce_scatter_sum(const float* send, float* recv, int64_t n_per_rank) {
  check_usable("MPI_Ireduce_scatter_block");
  const Clock::time_point deadline = deadline_after(options_.timeout_s);
  check_count("MPI_Ireduce_scatter_block", "n_per_rank", n_per_rank);
  requests_.clear();
  if (n_per_rank <= options_.max_message_elements) {
    requests_.emplace_back();
    MOESIM_MPI_CHECK(MPI_Ireduce_scatter_block(send, recv, static_cast<int>(n_per_rank), MPI_FLOAT, MPI_SUM, comm_,
                                               &requests_.back()));
    complete("MPI_Ireduce_scatter_block", deadline);
    return;
  }
  // Larger blocks: one reduction per (piece, owner), all started at once, in the same order on
  // every rank.
  for_each_piece(n_per_rank, [&](int64_t offset, int count) {
    for (int root = 0; root < size_; ++root) {
      requests_.emplace_back();
      MOESIM_MPI_CHECK(MPI_Ireduce(send + static_cast<int64_t>(root) * n_per_rank + offset,
                                   root == rank_ ? recv + offset : nullptr, count, MPI_FLOAT, MPI_SUM, root, comm_,
                                   &requests_.back()));
    }
  });
  complete("reduce_scatter_sum (MPI_Ireduce per block)", deadline);
}

void MpiComm::send(const float* data, int64_t n, int peer, int tag) {
  constexpr std::string_view what = "send (MPI_Isend)";
  check_usable(what);
  const Clock::time_point deadline = deadline_after(options_.timeout_s);
  check_count(what, "n", n);
  check_peer(what, peer, tag);
  requests_.clear();
  post_sends(data, n, peer, tag);
  complete(what, deadline);
}

void MpiComm::recv(float* data, int64_t n, int peer, int tag) {
  constexpr std::string_view what = "recv (MPI_Irecv)";
  check_usable(what);
  const Clock::time_point deadline = deadline_after(options_.timeout_s);
  check_count(what, "n", n);
  check_peer(what, peer, tag);
  requests_.clear();
  expected_.clear();
  post_recvs(data, n, peer, tag);
  complete_receives(what, deadline);
  check_received(what);
}

void MpiComm::all_to_all_counts(const std::vector<int64_t>& send_counts, std::vector<int64_t>& recv_counts) {
  constexpr std::string_view what = "all_to_all_counts (MPI_Ialltoall)";
  check_usable(what);
  const Clock::time_point deadline = deadline_after(options_.timeout_s);
  check_counts(what, "send_counts", send_counts);
  recv_counts.assign(static_cast<size_t>(size_), 0);
  requests_.clear();
  requests_.emplace_back();
  MOESIM_MPI_CHECK(MPI_Ialltoall(send_counts.data(), 1, MPI_INT64_T, recv_counts.data(), 1, MPI_INT64_T, comm_,
                                 &requests_.back()));
  complete(what, deadline);
}

void MpiComm::barrier() {
  check_usable("MPI_Ibarrier");
  const Clock::time_point deadline = deadline_after(options_.timeout_s);
  requests_.clear();
  requests_.emplace_back();
  MOESIM_MPI_CHECK(MPI_Ibarrier(comm_, &requests_.back()));
  complete("MPI_Ibarrier", deadline);
}

std::unique_ptr<Comm> MpiComm::split(int color, int key) const {
  constexpr std::string_view what = "split (MPI_Iallgather + MPI_Comm_split)";
  check_usable(what);
  const Clock::time_point deadline = deadline_after(options_.timeout_s);
  if (color < 0) usage_error(what, fmt::format("color {} is negative", color));
  // MPI_Comm_split blocks with no deadline, so first learn that every rank has arrived (the
  // gathered colors and keys are otherwise unused).
  const int mine[2] = {color, key};
  std::vector<int> all(2 * static_cast<size_t>(size_));
  std::vector<MPI_Request> requests(1);
  std::vector<MPI_Status> statuses;
  MOESIM_MPI_CHECK(MPI_Iallgather(mine, 2, MPI_INT, all.data(), 2, MPI_INT, comm_, requests.data()));
  Outcome outcome = Outcome::kDone;
  try {
    outcome = poll(requests, statuses, deadline, what);
  } catch (const Error& e) {
    fail(e.what());
  }
  if (outcome == Outcome::kTimedOut) fail(timeout_message(what, name_, options_.timeout_s));
  MPI_Comm group = MPI_COMM_NULL;
  MOESIM_MPI_CHECK(MPI_Comm_split(comm_, color, key, &group));
  return std::make_unique<MpiComm>(group, fmt::format("{}/color {}", name_, color), options_);
}

}  // namespace

std::unique_ptr<Comm> make_mpi_comm(double timeout_s) {
  MpiCommOptions options;
  options.timeout_s = timeout_s;
  return make_mpi_comm(options);
}

std::unique_ptr<Comm> make_mpi_comm(const MpiCommOptions& options) {
  validate_options(options);
  MpiRuntime::instance();
  const Clock::time_point deadline = deadline_after(options.timeout_s);
  MPI_Comm world = MPI_COMM_NULL;
  std::vector<MPI_Request> requests(1);
  std::vector<MPI_Status> statuses;
  MOESIM_MPI_CHECK(MPI_Comm_idup(MPI_COMM_WORLD, &world, requests.data()));
  if (poll(requests, statuses, deadline, "MPI_Comm_idup") == Outcome::kTimedOut)
    throw Error(timeout_message("MPI_Comm_idup", "MPI_COMM_WORLD", options.timeout_s));
  return std::make_unique<MpiComm>(world, "mpi world", options);
}

bool launched_by_mpi() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(var)) return true;
  int initialized = 0;
  return MPI_Initialized(&initialized) == MPI_SUCCESS && initialized;
}

void all_reduce_sum_host(Comm& comm, float* data, int64_t n) {
  if (comm.buffer_device() == Device::kCpu) return comm.all_reduce_sum(data, n);
  Tensor staged = Tensor::from({n}, std::vector<float>(data, data + n), comm.buffer_device());
  comm.all_reduce_sum(staged.device_f32(), n);
  const std::vector<float> back = staged.to_vector();
  std::copy(back.begin(), back.end(), data);
}

void all_gather_host(Comm& comm, const float* send, float* recv, int64_t n_per_rank) {
  if (comm.buffer_device() == Device::kCpu) return comm.all_gather(send, recv, n_per_rank);
  const Tensor staged_send = Tensor::from({n_per_rank}, std::vector<float>(send, send + n_per_rank), comm.buffer_device());
  Tensor staged_recv = Tensor::empty({n_per_rank * comm.size()}, DType::kF32, comm.buffer_device());
  comm.all_gather(staged_send.device_f32(), staged_recv.device_f32(), n_per_rank);
  const std::vector<float> back = staged_recv.to_vector();
  std::copy(back.begin(), back.end(), recv);
}

int local_rank() {
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"})
    if (const char* v = std::getenv(var)) return std::max(0, std::atoi(v));
  int initialized = 0, finalized = 0;
  if (MPI_Initialized(&initialized) != MPI_SUCCESS || !initialized || MPI_Finalized(&finalized) != MPI_SUCCESS ||
      finalized)
    return 0;
  MPI_Comm node = MPI_COMM_NULL;
  int rank = 0, node_rank = 0;
  MOESIM_MPI_CHECK(MPI_Comm_rank(MPI_COMM_WORLD, &rank));
  MOESIM_MPI_CHECK(MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &node));
  MOESIM_MPI_CHECK(MPI_Comm_rank(node, &node_rank));
  MOESIM_MPI_CHECK(MPI_Comm_free(&node));
  return node_rank;
}

void abort_all(const std::string& why) {
  std::fprintf(stderr, "moesim: aborting all ranks: %s\n", why.c_str());
  std::fflush(stderr);
  int initialized = 0, finalized = 1;
  if (MPI_Initialized(&initialized) == MPI_SUCCESS && initialized && MPI_Finalized(&finalized) == MPI_SUCCESS &&
      !finalized)
    MPI_Abort(MPI_COMM_WORLD, 1);
  std::_Exit(1);
}

}  // namespace moesim::exec
