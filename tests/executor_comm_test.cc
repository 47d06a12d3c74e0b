// The MPI communication layer, run by CTest under mpirun on 2 and 3 ranks: every rank runs every
// test case, in the same order. Inputs are small integers, exact in fp32, so every result is
// compared bit for bit. Each test case makes its communicators first (before anything can fail),
// and a listener makes the ranks meet after each test case on a communicator of its own, so a
// failure on one rank stays inside its test case instead of shifting the next one's calls.
#include "executor/comm.h"
#include "executor/error.h"

// Listeners outside the main file need the reporter interfaces.
#define CATCH_CONFIG_EXTERNAL_INTERFACES
#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

using namespace moesim;
using Catch::Matchers::Contains;

namespace {

// Generous: under `ctest -j2` the ranks share 2 cores with other tests.
constexpr double kTimeout_s = 30;
// The timeout tests' deadline.
constexpr double kShortTimeout_s = 1;

std::unique_ptr<exec::Comm> world(int64_t max_message_elements = INT_MAX, double timeout_s = kTimeout_s) {
  exec::MpiCommOptions options;
  options.timeout_s = timeout_s;
  options.max_message_elements = max_message_elements;
  return exec::make_mpi_comm(options);
}

class RankSync : public Catch::TestEventListenerBase {
 public:
  using TestEventListenerBase::TestEventListenerBase;
  void testCaseStarting(const Catch::TestCaseInfo&) override {
    if (!control()) control() = world();
  }
  void testCaseEnded(const Catch::TestCaseStats&) override { control()->barrier(); }

 private:
  static std::unique_ptr<exec::Comm>& control() {
    static std::unique_ptr<exec::Comm> comm;
    return comm;
  }
};
CATCH_REGISTER_LISTENER(RankSync)

// "" when equal bit for bit, else the first difference.
std::string first_difference(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) return fmt::format("size {} vs {}", got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i)
    if (got[i] != want[i]) return fmt::format("[{}] {} vs {}", i, got[i], want[i]);
  return "";
}

// Element i of what rank `src` sends to rank `dst`: exact in fp32 (< 2^24) for i < 10000.
float element(int src, int dst, int64_t i) { return static_cast<float>(src * 100000 + dst * 10000 + i); }

using CountFn = int64_t (*)(int src, int dst);

// One all_to_all_v where rank s sends count(s, d) elements to rank d.
void check_all_to_all_v(exec::Comm& comm, CountFn count) {
  const int me = comm.rank(), n = comm.size();
  std::vector<int64_t> send_counts(static_cast<size_t>(n)), recv_counts(static_cast<size_t>(n));
  std::vector<float> send, want;
  for (int d = 0; d < n; ++d) {
    send_counts[static_cast<size_t>(d)] = count(me, d);
    for (int64_t i = 0; i < count(me, d); ++i) send.push_back(element(me, d, i));
  }
  for (int s = 0; s < n; ++s) {
    recv_counts[static_cast<size_t>(s)] = count(s, me);
    for (int64_t i = 0; i < count(s, me); ++i) want.push_back(element(s, me, i));
  }
  std::vector<float> recv(want.size(), -1.0f);
  comm.all_to_all_v(send.data(), send_counts, recv.data(), recv_counts);
  CHECK(first_difference(recv, want) == "");
}

int64_t counts_uneven(int s, int d) { return (s * 5 + d * 3 + 1) % 7; }
int64_t counts_zero_self_and_upward(int s, int d) { return s <= d ? 0 : 5 + s + d; }
int64_t counts_zero(int, int) { return 0; }
int64_t counts_hundreds(int s, int d) { return (s + 1) * (d + 2) * 37; }

bool is_waiting_rank(const exec::Comm& c) { return c.rank() != 1; }  // rank 1 plays the missing peer

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

// The shared-memory transport's single-copy setting as this process started (before MPI did).
const char* const kSingleCopyVar = "OMPI_MCA_btl_vader_single_copy_mechanism";
const std::string g_single_copy_at_start = std::getenv(kSingleCopyVar) ? std::getenv(kSingleCopyVar) : "";

TEST_CASE("launched_by_mpi is true under mpirun, and the world has every rank") {
  auto comm = world();
  // Exchanges copy through the shared segment (see mpi_comm.cc), unless the user said otherwise.
  REQUIRE(std::getenv(kSingleCopyVar) != nullptr);
  CHECK(std::string(std::getenv(kSingleCopyVar)) == (g_single_copy_at_start.empty() ? "none" : g_single_copy_at_start));
  CHECK(exec::launched_by_mpi());
  CHECK(comm->size() >= 1);
  CHECK(comm->rank() < comm->size());
  CHECK(comm->name() == "mpi world");
}

TEST_CASE("all_to_all_v moves uneven and zero counts bit for bit, whole or in pieces") {
  // INT_MAX: one message per pair; 4 and 1: the path that splits counts above MPI's int limit.
  const int64_t max_elements = GENERATE(as<int64_t>{}, INT_MAX, 4, 1);
  auto comm = world(max_elements);
  CAPTURE(max_elements);
  check_all_to_all_v(*comm, counts_uneven);
  check_all_to_all_v(*comm, counts_zero_self_and_upward);
  check_all_to_all_v(*comm, counts_zero);
  check_all_to_all_v(*comm, counts_hundreds);
}

TEST_CASE("all_to_all_counts tells each rank what every rank sends it, int64 counts included") {
  auto comm = world();
  const int me = comm->rank(), n = comm->size();
  auto count = [](int s, int d) { return int64_t{5'000'000'000} + s * 10 + d; };  // above INT_MAX
  std::vector<int64_t> send_counts(static_cast<size_t>(n)), recv_counts;
  for (int d = 0; d < n; ++d) send_counts[static_cast<size_t>(d)] = count(me, d);
  comm->all_to_all_counts(send_counts, recv_counts);
  REQUIRE(recv_counts.size() == static_cast<size_t>(n));
  for (int s = 0; s < n; ++s) CHECK(recv_counts[static_cast<size_t>(s)] == count(s, me));

  // The usual MoE sequence: exchange the counts, then the tokens.
  for (int d = 0; d < n; ++d) send_counts[static_cast<size_t>(d)] = counts_uneven(me, d);
  comm->all_to_all_counts(send_counts, recv_counts);
  for (int s = 0; s < n; ++s) CHECK(recv_counts[static_cast<size_t>(s)] == counts_uneven(s, me));
  check_all_to_all_v(*comm, counts_uneven);
}

TEST_CASE("all_reduce_sum adds every rank's values exactly, whole or in pieces") {
  const int64_t max_elements = GENERATE(as<int64_t>{}, INT_MAX, 7);
  auto comm = world(max_elements);
  CAPTURE(max_elements);
  const int me = comm->rank(), n = comm->size();
  const int64_t count = 1000;
  std::vector<float> data(count), want(count, 0.0f);
  for (int64_t i = 0; i < count; ++i) {
    data[static_cast<size_t>(i)] = static_cast<float>((me + 1) * (i % 13) - i % 5);
    for (int r = 0; r < n; ++r) want[static_cast<size_t>(i)] += static_cast<float>((r + 1) * (i % 13) - i % 5);
  }
  comm->all_reduce_sum(data.data(), count);
  CHECK(first_difference(data, want) == "");
  comm->all_reduce_sum(nullptr, 0);  // an empty reduction is a valid (collective) call
}

TEST_CASE("all_gather puts rank r's block at r * n, separate or in place, whole or in pieces") {
  const int64_t max_elements = GENERATE(as<int64_t>{}, INT_MAX, 5);
  auto comm = world(max_elements);
  CAPTURE(max_elements);
  const int me = comm->rank(), n = comm->size();
  const int64_t per_rank = 37;
  std::vector<float> send(per_rank), want;
  for (int64_t i = 0; i < per_rank; ++i) send[static_cast<size_t>(i)] = element(me, 0, i);
  for (int r = 0; r < n; ++r)
    for (int64_t i = 0; i < per_rank; ++i) want.push_back(element(r, 0, i));

  std::vector<float> recv(want.size(), -1.0f);
  comm->all_gather(send.data(), recv.data(), per_rank);
  CHECK(first_difference(recv, want) == "");

  std::vector<float> in_place(want.size(), -1.0f);
  std::copy(send.begin(), send.end(), in_place.begin() + me * per_rank);
  comm->all_gather(in_place.data() + me * per_rank, in_place.data(), per_rank);
  CHECK(first_difference(in_place, want) == "");
}

TEST_CASE("reduce_scatter_sum gives rank r the sum of every rank's block r, whole or in pieces") {
  const int64_t max_elements = GENERATE(as<int64_t>{}, INT_MAX, 5);
  auto comm = world(max_elements);
  CAPTURE(max_elements);
  const int me = comm->rank(), n = comm->size();
  const int64_t per_rank = 23;
  std::vector<float> send(static_cast<size_t>(per_rank * n)), recv(static_cast<size_t>(per_rank), -1.0f),
      want(static_cast<size_t>(per_rank));
  for (int64_t j = 0; j < per_rank * n; ++j) send[static_cast<size_t>(j)] = static_cast<float>((me + 1) * j);
  // sum over r of (r + 1) * j = j * n (n + 1) / 2, j = me * per_rank + i.
  for (int64_t i = 0; i < per_rank; ++i)
    want[static_cast<size_t>(i)] = static_cast<float>((me * per_rank + i) * n * (n + 1) / 2);
  comm->reduce_scatter_sum(send.data(), recv.data(), per_rank);
  CHECK(first_difference(recv, want) == "");
}

TEST_CASE("send/recv: a ring of large messages, and tags matched out of order") {
  const int64_t max_elements = GENERATE(as<int64_t>{}, INT_MAX, 4096);
  auto comm = world(max_elements);
  CAPTURE(max_elements);
  const int me = comm->rank(), n = comm->size();
  if (n < 2) return;
  const int next = (me + 1) % n, prev = (me + n - 1) % n;
  const int64_t count = 100'000;  // 400 kB: past the eager limit, so a send waits for its recv
  std::vector<float> out(count), in(count, -1.0f), want(count);
  for (int64_t i = 0; i < count; ++i) {
    out[static_cast<size_t>(i)] = static_cast<float>(me * 1'000'000 + i);
    want[static_cast<size_t>(i)] = static_cast<float>(prev * 1'000'000 + i);
  }
  if (me == 0) {  // rank 0 starts the ring, the others pass it on
    comm->send(out.data(), count, next, 3);
    comm->recv(in.data(), count, prev, 3);
  } else {
    comm->recv(in.data(), count, prev, 3);
    comm->send(out.data(), count, next, 3);
  }
  CHECK(first_difference(in, want) == "");

  // Small (eager) messages: rank 0 sends tag 5 then 6, rank 1 takes 6 first.
  if (me == 0) {
    const std::vector<float> five{5, 55}, six{6, 66, 666};
    comm->send(five.data(), 2, 1, 5);
    comm->send(six.data(), 3, 1, 6);
  } else if (me == 1) {
    std::vector<float> five(2), six(3);
    comm->recv(six.data(), 3, 0, 6);
    comm->recv(five.data(), 2, 0, 5);
    CHECK(first_difference(five, {5, 55}) == "");
    CHECK(first_difference(six, {6, 66, 666}) == "");
  }
}

TEST_CASE("split forms groups by color, ordered by key") {
  auto comm = world();
  const int me = comm->rank(), n = comm->size();

  // One group, keys reversing the order.
  auto reversed = comm->split(0, n - me);
  CHECK(reversed->size() == n);
  CHECK(reversed->rank() == n - 1 - me);
  CHECK(reversed->name() == "mpi world/color 0");
  const float mine = static_cast<float>(me);
  std::vector<float> gathered(static_cast<size_t>(n), -1.0f), want(static_cast<size_t>(n));
  for (int r = 0; r < n; ++r) want[static_cast<size_t>(r)] = static_cast<float>(n - 1 - r);
  reversed->all_gather(&mine, gathered.data(), 1);
  CHECK(first_difference(gathered, want) == "");

  // Even and odd ranks: each group sums its own world ranks.
  auto parity = comm->split(me % 2, me);
  int members = 0;
  float sum_of_ranks = 0;
  for (int r = me % 2; r < n; r += 2) {
    ++members;
    sum_of_ranks += static_cast<float>(r);
  }
  CHECK(parity->size() == members);
  CHECK(parity->rank() == me / 2);
  float value = static_cast<float>(me);
  parity->all_reduce_sum(&value, 1);
  CHECK(value == sum_of_ranks);
  // A group of a group.
  auto again = parity->split(0, 0);
  CHECK(again->size() == members);
  CHECK(again->name() == "mpi world/color " + std::to_string(me % 2) + "/color 0");
  again->barrier();
}

TEST_CASE("bad arguments throw exec::Error before any communication") {
  auto comm = world();
  const int me = comm->rank(), n = comm->size();
  std::vector<float> buffer(16);
  std::vector<int64_t> short_counts(static_cast<size_t>(n) + 1, 0);
  CHECK_THROWS_WITH(comm->all_to_all_v(buffer.data(), short_counts, buffer.data(), short_counts),
                    Contains("send_counts has " + std::to_string(n + 1) + " entries"));
  std::vector<int64_t> negative(static_cast<size_t>(n), 0), zero(static_cast<size_t>(n), 0);
  negative[0] = -1;
  CHECK_THROWS_WITH(comm->all_to_all_v(buffer.data(), zero, buffer.data(), negative),
                    Contains("recv_counts[0] = -1 is negative"));
  std::vector<int64_t> self = zero;
  self[static_cast<size_t>(me)] = 1;
  CHECK_THROWS_WITH(comm->all_to_all_v(buffer.data(), self, buffer.data(), zero),
                    Contains("this rank to itself"));
  CHECK_THROWS_WITH(comm->all_reduce_sum(buffer.data(), -3), Contains("n = -3 is negative"));
  CHECK_THROWS_WITH(comm->send(buffer.data(), 1, n, 0), Contains("is not another rank"));
  CHECK_THROWS_WITH(comm->recv(buffer.data(), 1, me, 0), Contains("is not another rank"));
  if (n > 1) CHECK_THROWS_WITH(comm->send(buffer.data(), 1, (me + 1) % n, 32767), Contains("tag 32767"));
  CHECK_THROWS_WITH(comm->split(-1, 0), Contains("color -1 is negative"));
  CHECK_THROWS_AS(exec::make_mpi_comm(0.0), exec::Error);
  exec::MpiCommOptions zero_pieces;
  zero_pieces.max_message_elements = 0;
  CHECK_THROWS_WITH(exec::make_mpi_comm(zero_pieces), Contains("max_message_elements"));
  // None of these touched the communicator: it still works.
  float one = 1;
  comm->all_reduce_sum(&one, 1);
  CHECK(one == static_cast<float>(n));
}

TEST_CASE("counts that disagree between two ranks are reported, not silently misdelivered") {
  auto too_short = world(), too_long = world();
  const int me = too_short->rank(), n = too_short->size();
  if (n < 2) return;
  // Rank 0 sends 3 elements to rank 1; rank 1 expects 2, then 4. Every other pair sends nothing.
  std::vector<int64_t> send_counts(static_cast<size_t>(n), 0), recv_counts(static_cast<size_t>(n), 0);
  if (me == 0) send_counts[1] = 3;
  const std::vector<float> send{1, 2, 3};
  std::vector<float> recv(4, -1.0f);
  if (me == 1) {
    recv_counts[0] = 2;  // MPI reports the truncation
    CHECK_THROWS_WITH(too_short->all_to_all_v(send.data(), send_counts, recv.data(), recv_counts),
                      Contains("rank 1: MPI_Testall (all_to_all_v") && Contains("failed"));
    recv_counts[0] = 4;  // a short message is caught by the count check
    CHECK_THROWS_WITH(too_long->all_to_all_v(send.data(), send_counts, recv.data(), recv_counts),
                      Contains("received 3 elements from rank 0 where 4 were expected"));
    // A failed communicator refuses further calls.
    CHECK_THROWS_WITH(too_long->barrier(), Contains("unusable after an earlier failure"));
  } else {
    too_short->all_to_all_v(send.data(), send_counts, recv.data(), recv_counts);
    too_long->all_to_all_v(send.data(), send_counts, recv.data(), recv_counts);
  }
}

TEST_CASE("a collective a peer skips times out on the waiting ranks with a clear message") {
  auto skipped_reduce = world(INT_MAX, kShortTimeout_s), skipped_a2a = world(INT_MAX, kShortTimeout_s);
  auto sync = world();
  const int me = sync->rank(), n = sync->size();
  if (n < 2) return;
  if (is_waiting_rank(*sync)) {
    std::vector<float> data(8, 1.0f);
    const auto t0 = std::chrono::steady_clock::now();
    CHECK_THROWS_WITH(skipped_reduce->all_reduce_sum(data.data(), 8),
                      Contains("rank " + std::to_string(me) +
                               ": MPI_Iallreduce on mpi world did not complete within 1 s (a peer died or hangs?)"));
    const double waited_s = seconds_since(t0);
    CHECK(waited_s >= kShortTimeout_s);
    CHECK(waited_s < 20 * kShortTimeout_s);  // a loose bound: the point is that it does not hang
    CHECK_THROWS_WITH(skipped_reduce->all_reduce_sum(data.data(), 8),
                      Contains("unusable after an earlier failure") && Contains("did not complete within"));

    std::vector<int64_t> counts(static_cast<size_t>(n), 2);
    std::vector<float> send(2 * static_cast<size_t>(n), 1.0f), recv(2 * static_cast<size_t>(n));
    CHECK_THROWS_WITH(skipped_a2a->all_to_all_v(send.data(), counts, recv.data(), counts),
                      Contains("all_to_all_v (MPI_Isend/MPI_Irecv) on mpi world did not complete within 1 s"));
  }
  // Everyone meets again on another communicator, which works as before.
  sync->barrier();
  float value = 1;
  sync->all_reduce_sum(&value, 1);
  CHECK(value == static_cast<float>(n));
}

TEST_CASE("a recv that times out is cancelled, and the communicator stays usable") {
  auto p2p = world(INT_MAX, kShortTimeout_s), sync = world();
  const int me = sync->rank();
  if (sync->size() < 2) return;
  std::vector<float> got(3, -1.0f);
  if (me == 0) {
    CHECK_THROWS_WITH(p2p->recv(got.data(), 3, 1, 9),
                      Contains("rank 0: recv (MPI_Irecv) on mpi world did not complete within 1 s"));
    sync->barrier();  // now rank 1 sends
    p2p->recv(got.data(), 3, 1, 9);
    CHECK(first_difference(got, {7, 8, 9}) == "");
  } else if (me == 1) {
    sync->barrier();
    const std::vector<float> data{7, 8, 9};
    p2p->send(data.data(), 3, 0, 9);
  } else {
    sync->barrier();
  }
}

// Not run by default: CTest runs it alone ("executor_comm_test: abort_all ..."), expecting the
// message on stderr and every rank ended.
TEST_CASE("abort_all ends every rank after a collective times out", "[.abort]") {
  auto skipped = world(INT_MAX, kShortTimeout_s), sync = world();
  if (sync->size() < 2) FAIL("needs 2 ranks");
  if (!is_waiting_rank(*sync)) {
    sync->barrier();  // ended by rank 0's abort_all long before its deadline
    FAIL("rank 1 outlived abort_all");
  }
  float value = 1;
  try {
    skipped->all_reduce_sum(&value, 1);
  } catch (const exec::Error& e) {
    exec::abort_all(e.what());
  }
  FAIL("the skipped all_reduce_sum did not time out");
}
