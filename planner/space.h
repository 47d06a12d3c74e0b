// The strategy space: every candidate strategy for a setup's cluster, model and workload
// (planner/planner.h states the rules).
#pragma once

#include "costmodel/setup.h"
#include "planner/planner.h"

#include <cstdint>
#include <vector>

namespace moesim::planner {

// A strategy plus the two workload knobs the planner may change: micro-batch size and recompute.
struct Candidate {
  strategy::Strategy strategy;                     // named after its knobs ("dp16-tp1-pp4-ep8-...")
  int64_t micro_batch = 1;                         // training: sequences per micro-batch (0 for inference)
  workload::Recompute recompute = workload::NONE;  // training: the workload's recompute mode
};

// "dp16 tp1 pp4 ep8 z1 1f1b mb1 sel direct c1": the knobs in one line.
std::string candidate_name(const Candidate& c);

struct Space {
  std::vector<Candidate> candidates;   // every combination of knobs whose degrees divide
  int64_t layouts = 0;                 // distinct (dp, tp, pp, ep) layouts among them
  int64_t pruned_divisibility = 0;     // (dp, tp, pp, ep, micro-batch) combinations that do not divide
};

// Every candidate, pinned knobs fixed. `base` supplies the cluster, model and workload.
Space enumerate(const cost::Setup& base, const SearchOptions& options);

// The divisors of n in increasing order.
std::vector<int> divisors(int64_t n);

}  // namespace moesim::planner
