#include "executor/microbench.h"

#include "costmodel/model.h"
#include "costmodel/routing_model.h"
#include "executor/layers.h"
#include "executor/moe_layer.h"
#include "traces/validation.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <utility>

namespace moesim::exec {
namespace {

using Clock = std::chrono::steady_clock;
constexpr double kElem = 4;  // fp32 bytes: the cost model's bytes for these kernels at FP32

// Repeated timings' statistic: the lower quartile, as validation measures (traces/validation.h:
// other tenants of a shared machine only ever slow a sample down).
double quiet(const std::vector<double>& v) { return trace::quantile(v, trace::kQuietQuantile); }

// Filled with a fixed ramp in [-1, 1) (values do not change BLAS or elementwise timings, but keep
// softmax and GELU away from special cases).
Tensor filled(Backend& b, std::vector<int64_t> shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  std::vector<float> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = static_cast<float>((i * 37) % 200) / 100.0f - 1.0f;
  return Tensor::from(std::move(shape), v, b.device());
}

// Pairs of buffers of one shape (a filled input, a zeroed output), as many as together outgrow a
// last-level cache (96 MB); each call of a sample takes the next pair, so that it finds its data
// out of cache, as a step's ops and exchanges find theirs.
class BufferRing {
 public:
  BufferRing(Backend& b, const std::vector<int64_t>& shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    constexpr double kRingBytes = 96e6;
    const double pair_bytes = 2 * static_cast<double>(n) * sizeof(float);
    const int pairs = static_cast<int>(std::clamp(std::ceil(kRingBytes / pair_bytes), 2.0, 4096.0));
    for (int i = 0; i < pairs; ++i) {
      in_.push_back(filled(b, shape));
      out_.push_back(Tensor::zeros(shape, DType::kF32, b.device()));
    }
  }
  const float* in() const { return in_[next_].device_f32(); }
  float* out() { return out_[next_].device_f32(); }
  void advance() { next_ = (next_ + 1) % in_.size(); }

 private:
  std::vector<Tensor> in_, out_;
  size_t next_ = 0;
};

class Bench {
 public:
  Bench(Backend& b, Comm* world, const MicrobenchOptions& o) : b_(b), world_(world), o_(o) {}

  // Seconds per call of fn: batches repeated until min_sample_s / 5 each, the lower quartile of 5.
  double time(const std::function<void()>& fn) {
    if (world_) world_->barrier();  // ranks run each sample at the same time
    fn();
    b_.synchronize();
    std::vector<double> batches;
    for (int batch = 0; batch < 5; ++batch) {
      int reps = 0;
      const auto t0 = Clock::now();
      double elapsed = 0;
      do {
        fn();
        ++reps;
        b_.synchronize();
        elapsed = std::chrono::duration<double>(Clock::now() - t0).count();
      } while (elapsed < o_.min_sample_s / 5);
      batches.push_back(elapsed / reps);
    }
    return quiet(batches);
  }

  // A collective: `reps` repetitions (the same on every rank), each after a barrier; the lower quartile.
  double time_collective(int reps, const std::function<void()>& fn) {
    fn();  // warm-up
    std::vector<double> times;
    for (int i = 0; i < reps; ++i) {
      world_->barrier();
      const auto t0 = Clock::now();
      fn();
      b_.synchronize();
      times.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    }
    return quiet(times);
  }

  Backend& b_;
  Comm* world_;
  const MicrobenchOptions& o_;
};

void gemm_forms(Bench& bench, Backend& b, int64_t m, int64_t k, int64_t n, int groups, std::vector<cost::KernelSample>& out) {
  const Tensor x = filled(b, {groups, m, k}), w = filled(b, {groups, k, n}), dy = filled(b, {groups, m, n});
  Tensor y = Tensor::zeros({groups, m, n}, DType::kF32, b.device()), dx = Tensor::zeros({groups, m, k}, DType::kF32, b.device()),
         dw = Tensor::zeros({groups, k, n}, DType::kF32, b.device());
  const double flops = 2.0 * static_cast<double>(m * n * k) * groups;
  const double bytes = groups * static_cast<double>(m * k + m * n + k * n) * kElem;
  auto each = [&](auto&& one) {
    return [&, one] {
      for (int g = 0; g < groups; ++g) one(g);
    };
  };
  // Forward Y = X W, dX = dY W^T, dW = X^T dY (a linear layer's three GEMMs).
  out.push_back({flops, bytes, bench.time(each([&](int g) {
                   b.gemm(false, false, m, n, k, 1.0f, x.device_f32() + g * m * k, w.device_f32() + g * k * n, 0.0f,
                          y.device_f32() + g * m * n);
                 })), 0, static_cast<double>(groups)});
  out.push_back({flops, bytes, bench.time(each([&](int g) {
                   b.gemm(false, true, m, k, n, 1.0f, dy.device_f32() + g * m * n, w.device_f32() + g * k * n, 0.0f,
                          dx.device_f32() + g * m * k);
                 })), 0, static_cast<double>(groups)});
  out.push_back({flops, bytes, bench.time(each([&](int g) {
                   b.gemm(true, false, k, n, m, 1.0f, x.device_f32() + g * m * k, dy.device_f32() + g * m * n, 1.0f,
                          dw.device_f32() + g * k * n);
                 })), 0, static_cast<double>(groups)});
}

// The attention sublayer (LayerNorm + attention), forward and backward.
AttentionSample attention_sample(Bench& bench, Backend& b, int64_t batch, int64_t seq, int64_t d_model, int64_t heads) {
  LayerNorm ln(b, "bench.ln", d_model);
  CausalSelfAttention attn(b, "bench.attn", d_model, heads, 1);
  const Tensor x = filled(b, {batch * seq, d_model}), dy = filled(b, {batch, seq, d_model});
  // The backward re-reads what the last forward kept, so it repeats on its own.
  const double f = bench.time([&] { attn.forward(ln.forward(x).reshaped({batch, seq, d_model})); });
  const double b_s = bench.time([&] { ln.backward(attn.backward(dy).reshaped({batch * seq, d_model})); });
  return {batch, seq, d_model, heads, f, b_s};
}

void memory_samples(Bench& bench, Backend& b, int64_t tokens, int64_t d, int64_t f, Microbenchmarks& m) {
  LayerNorm ln(b, "bench.ln", d);
  const Tensor x = filled(b, {tokens, d}), dy = filled(b, {tokens, d});
  const double td = static_cast<double>(tokens * d), tf = static_cast<double>(tokens * f);
  m.norm.push_back({0, 2 * td * kElem, bench.time([&] { ln.forward(x); })});   // cost model: rows x width in and out
  m.norm_backward.push_back({0, 4 * td * kElem, bench.time([&] { ln.backward(dy); })});  // twice the forward's bytes
  const Tensor pre = filled(b, {tokens, f});
  Tensor act = Tensor::zeros({tokens, f}, DType::kF32, b.device()), dpre = Tensor::zeros({tokens, f}, DType::kF32, b.device());
  // GELU: the cost model's act op for a GELU FFN (up = f): bytes tokens (up + f), FLOPs per output.
  m.activation.push_back({cost::kActivationFlops * tf, 2 * tf * kElem,
                          bench.time([&] { b.gelu(pre.device_f32(), act.device_f32(), tokens * f); })});
  m.activation_backward.push_back({2 * cost::kActivationFlops * tf, 4 * tf * kElem, bench.time([&] {
                            b.gelu_backward(pre.device_f32(), act.device_f32(), dpre.device_f32(), tokens * f);
                          })});
  m.elementwise.push_back({0, 3 * td * kElem, bench.time([&] { residual_add(b, x, dy); })});
}

// Row gathers (gather_rows, as the embedding lookup and the MoE dispatch run it) of `rows` rows
// of `cols` at shuffled rows of a table as large as the output, cost model bytes (read and
// write), out of cache (BufferRing): in a step such an op reads rows written long before (expert
// outputs, the embedding table) and writes a fresh output, and runs at the memory's pace, where a
// gather repeated on warm buffers runs at the cache's (5-8x faster on the development VM).
void gather_samples(Bench& bench, Backend& b, int64_t rows, int64_t cols, Microbenchmarks& m) {
  std::vector<int32_t> index(static_cast<size_t>(rows));
  for (int64_t i = 0; i < rows; ++i)  // a fixed shuffle
    index[static_cast<size_t>(i)] = static_cast<int32_t>((i * 7919) % rows);
  const Tensor index_dev = Tensor::from_i32({rows}, index.data(), index.size(), b.device());
  BufferRing ring(b, {rows, cols});
  m.gather.push_back({0, 2 * static_cast<double>(rows * cols) * kElem, bench.time([&] {
                        b.gather_rows(ring.in(), index_dev.device_i32(), ring.out(), rows, cols);
                        ring.advance();
                      })});
}

// The row gathers of `tokens` tokens, top-2, `cols` wide, and a 64-row table (GatherKernels), on
// warm buffers: in a step they run on data a neighbouring op has just written (the dispatch on
// the gate's input, the combine on the exchange's output) or on a small table, and their ratios
// are the kernels' own work per byte (the combine reads and writes its output row once per
// choice: 2.1-2.4x the dispatch's time on the development VM, warm or inside moe-tiny's and the
// calibration step's MoE layers).
GatherKernels gather_kernels(Bench& bench, Backend& b, int64_t tokens, int64_t cols) {
  constexpr int k = 2;
  constexpr int64_t kTableRows = 64;
  const int64_t slots = tokens * k;
  std::vector<int32_t> token_of_slot(static_cast<size_t>(slots)), slot_of_choice(static_cast<size_t>(slots)),
      ids(static_cast<size_t>(tokens));
  for (int64_t s = 0; s < slots; ++s) {  // a fixed shuffle of the slots over the choices
    const int64_t a = (s * 7919) % slots;
    slot_of_choice[static_cast<size_t>(a)] = static_cast<int32_t>(s);
    token_of_slot[static_cast<size_t>(s)] = static_cast<int32_t>(a / k);
  }
  for (int64_t t = 0; t < tokens; ++t) ids[static_cast<size_t>(t)] = static_cast<int32_t>((t * 37 + 11) % kTableRows);
  const Tensor token_rows = filled(b, {tokens, cols}), slot_rows = filled(b, {slots, cols}), weight = filled(b, {slots}),
               table = filled(b, {kTableRows, cols});
  Tensor slots_out = Tensor::zeros({slots, cols}, DType::kF32, b.device()),
         tokens_out = Tensor::zeros({tokens, cols}, DType::kF32, b.device()),
         dweight = Tensor::zeros({slots}, DType::kF32, b.device()),
         dtable = Tensor::zeros({kTableRows, cols}, DType::kF32, b.device());
  const Tensor by_slot = Tensor::from_i32({slots}, token_of_slot.data(), token_of_slot.size(), b.device()),
               by_choice = Tensor::from_i32({slots}, slot_of_choice.data(), slot_of_choice.size(), b.device()),
               by_token = Tensor::from_i32({tokens}, ids.data(), ids.size(), b.device());
  const ScatterPlan plan = scatter_add_plan(ids.data(), ids.size());
  const Tensor by_table_row = Tensor::from_i32({static_cast<int64_t>(plan.packed.size())}, plan.packed.data(),
                                               plan.packed.size(), b.device());
  GatherKernels g{tokens, cols, kTableRows};
  g.copy_s = bench.time([&] { b.gather_rows(token_rows.device_f32(), by_slot.device_i32(), slots_out.device_f32(), slots, cols); });
  g.sum_s = bench.time([&] {
    b.gather_sum_rows(slot_rows.device_f32(), by_choice.device_i32(), weight.device_f32(), tokens_out.device_f32(),
                      tokens, k, cols);
  });
  g.lookup_s = bench.time([&] { b.gather_rows(table.device_f32(), by_token.device_i32(), tokens_out.device_f32(), tokens, cols); });
  g.sum_backward_s = bench.time([&] {
    b.gather_sum_rows(slot_rows.device_f32(), by_choice.device_i32(), nullptr, tokens_out.device_f32(), tokens, k, cols);
  });
  g.combine_backward_s = bench.time([&] {
    b.gather_sum_rows_backward(token_rows.device_f32(), slot_rows.device_f32(), by_choice.device_i32(),
                               weight.device_f32(), slots_out.device_f32(), dweight.device_f32(), tokens, k, cols);
  });
  g.scatter_add_s = bench.time([&] {
    b.scatter_add_rows(token_rows.device_f32(), by_token.device_i32(), by_table_row.device_i32(), plan.groups,
                       dtable.device_f32(), tokens, cols);
  });
  return g;
}

// The MoE capacity decision (assign_capacity, the host work of every EP rank's dispatch) over
// `tokens` tokens of 8 experts top-2, 1.0 capacity factor, under vanilla and batch-priority
// dropping: the second sorts the tokens by their top gate probability first. Each call decides
// the next of a ring of routings (hashed: distinct experts per token, priorities in (0, 1)) of
// 256K tokens in all, as a step's routing changes from one decision to the next: a routing
// repeated (or one of 16, for 256 tokens) lets the branch predictor learn the sort's comparisons,
// and its extra time came out 5-7x under the step's.
cost::SortSample capacity_sample(Bench& bench, int64_t tokens) {
  constexpr int kExperts = 8, kTopK = 2;
  const int kRoutings = static_cast<int>(std::clamp<int64_t>((int64_t{1} << 18) / tokens, 16, 1024));
  std::vector<std::vector<int32_t>> expert(kRoutings, std::vector<int32_t>(static_cast<size_t>(tokens * kTopK)));
  std::vector<std::vector<float>> priority(kRoutings, std::vector<float>(static_cast<size_t>(tokens)));
  for (int r = 0; r < kRoutings; ++r)
    for (int64_t t = 0; t < tokens; ++t) {
      uint64_t h = (static_cast<uint64_t>(t) << 16 | static_cast<uint64_t>(r)) * 0x9E3779B97F4A7C15ull;
      h ^= h >> 29;
      h *= 0xBF58476D1CE4E5B9ull;
      h ^= h >> 32;
      const int first = static_cast<int>(h % kExperts);
      expert[r][static_cast<size_t>(t * kTopK)] = first;
      expert[r][static_cast<size_t>(t * kTopK + 1)] = (first + 1 + static_cast<int>((h >> 8) % (kExperts - 1))) % kExperts;
      priority[r][static_cast<size_t>(t)] = static_cast<float>((h >> 20) % 1000000 + 1) / 1000001.0f;
    }
  const int64_t capacity = cost::expert_capacity(tokens, kExperts, kTopK, 1.0);
  auto decide = [&](RoutingPolicy p) {
    int r = 0;
    return bench.time([&] {
      assign_capacity(p, capacity, kExperts, kTopK, tokens, expert[r], priority[r]);
      r = (r + 1) % kRoutings;
    });
  };
  const double vanilla = decide(RoutingPolicy::kVanilla);
  return {static_cast<double>(tokens), vanilla, decide(RoutingPolicy::kBatchPriority)};
}

// Every measured time of m, in one fixed order.
template <typename F>
void each_time(Microbenchmarks& m, F f) {
  f(m.launch_s);
  for (auto* v : {&m.gemm, &m.grouped_gemm, &m.norm, &m.activation, &m.elementwise, &m.gather, &m.norm_backward,
                  &m.activation_backward, &m.optimizer})
    for (cost::KernelSample& s : *v) f(s.seconds);
  for (AttentionSample& s : m.attention) {
    f(s.forward_s);
    f(s.backward_s);
  }
  for (cost::SortSample& s : m.capacity) {
    f(s.vanilla_s);
    f(s.batch_priority_s);
  }
  for (GatherKernels& g : m.gather_kernels)
    for (double* t : {&g.copy_s, &g.sum_s, &g.lookup_s, &g.sum_backward_s, &g.combine_backward_s, &g.scatter_add_s})
      f(*t);
  for (auto* v : {&m.all_to_all, &m.all_reduce})
    for (CommSample& s : *v) f(s.seconds);
}

// Every kernel family of one round (MicrobenchOptions::kernels); progress in 0..0.85 of it.
void kernel_samples(Bench& bench, Backend& backend, const MicrobenchOptions& o,
                    const std::function<void(double)>& progress, Microbenchmarks& m) {
  // Launch overhead: the smallest kernels.
  {
    const Tensor a = filled(backend, {1, 1});
    Tensor c = Tensor::zeros({1, 1}, DType::kF32, backend.device());
    const double g = bench.time([&] { backend.gemm(false, false, 1, 1, 1, 1.0f, a.device_f32(), a.device_f32(), 0.0f, c.device_f32()); });
    const double e = bench.time([&] { backend.gelu(a.device_f32(), c.device_f32(), 1); });
    m.launch_s = std::min(g, e);
  }
  progress(0.05);
  const std::vector<int64_t> rows = o.quick ? std::vector<int64_t>{64, 1024} : std::vector<int64_t>{16, 64, 256, 1024, 4096};
  const std::vector<std::pair<int64_t, int64_t>> kn =
      o.quick ? std::vector<std::pair<int64_t, int64_t>>{{64, 192}, {256, 64}}
              : std::vector<std::pair<int64_t, int64_t>>{{64, 4}, {64, 64}, {64, 192}, {64, 256}, {256, 64}, {128, 128}, {512, 512}};
  for (int64_t r : rows)
    for (auto [k, n] : kn)
      if (!(r >= 4096 && k * n > 100000)) gemm_forms(bench, backend, r, k, n, 1, m.gemm);
  progress(0.4);
  for (int g : {1, 2, 4})
    for (int64_t r : o.quick ? std::vector<int64_t>{32, 256} : std::vector<int64_t>{8, 32, 128, 512}) {
      gemm_forms(bench, backend, r, 64, 128, g, m.grouped_gemm);
      gemm_forms(bench, backend, r, 128, 64, g, m.grouped_gemm);
    }
  progress(0.6);
  for (int64_t batch : o.quick ? std::vector<int64_t>{2, 8} : std::vector<int64_t>{1, 2, 4, 8, 16, 32})
    for (int64_t seq : {32, 64}) {
      m.attention.push_back(attention_sample(bench, backend, batch, seq, 64, 4));
      // A second head dim (32 against 16), so that calibration can tell the softmax's time per
      // score from the matmuls' per FLOP.
      if (batch % 2 == 0) m.attention.push_back(attention_sample(bench, backend, batch, seq, 64, 2));
    }
  progress(0.75);
  for (int64_t tokens : o.quick ? std::vector<int64_t>{256, 2048} : std::vector<int64_t>{128, 512, 2048, 8192})
    memory_samples(bench, backend, tokens, 64, 256, m);
  for (int64_t rows : o.quick ? std::vector<int64_t>{512} : std::vector<int64_t>{256, 1024, 4096})
    for (int64_t cols : {64, 256}) gather_samples(bench, backend, rows, cols, m);
  for (int64_t tokens : o.quick ? std::vector<int64_t>{256} : std::vector<int64_t>{128, 512})
    for (int64_t cols : {64, 256}) m.gather_kernels.push_back(gather_kernels(bench, backend, tokens, cols));
  for (int64_t n : o.quick ? std::vector<int64_t>{16384, 262144} : std::vector<int64_t>{4096, 32768, 262144, 1048576}) {
    Tensor p = filled(backend, {n}), g = filled(backend, {n});
    Tensor mo = Tensor::zeros({n}, DType::kF32, backend.device()), v = Tensor::zeros({n}, DType::kF32, backend.device());
    kernels::AdamHyper h;
    h.step_size = 1e-3f;
    const double np = static_cast<double>(n);
    m.optimizer.push_back({cost::kAdamFlopsPerParameter * np, 2 * 16 * np, bench.time([&] {
                             backend.adam_step(p.device_f32(), g.device_f32(), mo.device_f32(), v.device_f32(), n, h);
                           })});
  }
  for (int64_t tokens : o.quick ? std::vector<int64_t>{256, 2048} : std::vector<int64_t>{256, 1024, 4096, 16384})
    m.capacity.push_back(capacity_sample(bench, tokens));
  progress(0.85);
}

// One round: every sample once, averaged over the ranks; progress from `from` to `to`.
Microbenchmarks one_round(Backend& backend, Comm* world, const MicrobenchOptions& o, double from, double to) {
  Microbenchmarks m;
  m.ranks = world ? world->size() : 1;
  Bench bench(backend, world && world->size() > 1 ? world : nullptr, o);
  auto progress = [&](double f) {
    if (o.progress && (!world || world->rank() == 0)) o.progress(from + f * (to - from));
  };

  if (o.kernels) kernel_samples(bench, backend, o, progress, m);

  if (o.collectives && world && world->size() > 1) {
    const int n = world->size();
    // Sizes by 4x, and by 2^(1/4) where messages (bytes / n) are under 16 KB: transports switch
    // from eager sends to a rendezvous there (Open MPI's shared memory at 4 KB), a step in latency
    // the link fit looks for between two sizes (cost::fit_link).
    std::vector<double> sizes;
    for (double bytes = 1024; bytes <= (o.quick ? 256e3 : 4.2e6);)
      sizes.push_back(std::exchange(bytes, bytes * (!o.quick && bytes / n < 16384 ? std::pow(2.0, 0.25) : 4)));
    for (double bytes : sizes) {
      const int64_t per_peer = std::max<int64_t>(1, static_cast<int64_t>(bytes / sizeof(float)) / n);
      const int64_t total = per_peer * n;
      const std::vector<int64_t> counts(static_cast<size_t>(n), per_peer);
      const double s = static_cast<double>(total) * sizeof(float);
      const int reps = s < 1e5 ? 40 : 12;
      BufferRing ring(backend, {total});
      m.all_to_all.push_back({s, bench.time_collective(reps, [&] {
                                world->all_to_all_v(ring.in(), counts, ring.out(), counts);
                                ring.advance();
                              })});
      m.all_reduce.push_back({s, bench.time_collective(reps, [&] {
                                world->all_reduce_sum(ring.out(), total);
                                ring.advance();
                              })});
    }
  }
  // The slowest rank's figures (every rank measured the same samples in the same order): ranks
  // wait for each other at every exchange, so a step runs at its slowest rank's pace (on the
  // development VM rank 1's core runs its kernels 5-15% slower than rank 0's, run after run).
  if (world && world->size() > 1) {
    std::vector<float> mine;
    each_time(m, [&](double& t) { mine.push_back(static_cast<float>(t)); });
    std::vector<float> all(mine.size() * static_cast<size_t>(world->size()));
    all_gather_host(*world, mine.data(), all.data(), static_cast<int64_t>(mine.size()));
    size_t i = 0;
    each_time(m, [&](double& t) {
      t = 0;
      for (int r = 0; r < world->size(); ++r) t = std::max(t, static_cast<double>(all[r * mine.size() + i]));
      ++i;
    });
  }
  progress(1.0);
  return m;
}

}  // namespace

Microbenchmarks run_microbenchmarks(Backend& backend, Comm* world, const MicrobenchOptions& o) {
  const int rounds = std::max(1, o.rounds);
  std::vector<Microbenchmarks> all;
  for (int r = 0; r < rounds; ++r)
    all.push_back(one_round(backend, world, o, static_cast<double>(r) / rounds, static_cast<double>(r + 1) / rounds));
  // Per sample, the median over the rounds of each round's lower quartile: a stretch of the run
  // slowed by other tenants (seconds long on a shared VM) then moves no figure, and the figure is
  // the same statistic validation takes of a run's steps (a quartile of quartiles would be lower).
  std::vector<std::vector<double>> times;
  for (Microbenchmarks& m : all) {
    size_t i = 0;
    each_time(m, [&](double& t) {
      if (times.size() <= i) times.emplace_back();
      times[i++].push_back(t);
    });
  }
  Microbenchmarks m = std::move(all.front());
  size_t i = 0;
  each_time(m, [&](double& t) { t = trace::quantile(times[i++], 0.5); });
  return m;
}

}  // namespace moesim::exec
