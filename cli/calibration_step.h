// The calibration step: the small MoE transformer `moesim calibrate` trains in situ on its ranks
// (cli/calibrate_command.cc), and `moesim validate --suite` trains again to measure the machine's
// pace against its calibration (the profile's calibration_step_s). Not a model the suite
// validates: a 3-layer transformer, d 96, the middle layer MoE with 2 x ranks experts top-2 (4 on
// one rank), 8 sequences of 48 tokens per rank, DP = EP = ranks. Calibration also runs it with
// the MoE layer alone, for the exchanges' dependence on the working set.
#pragma once

#include <fmt/format.h>

#include <string>

namespace moesim::cli {

// `layers` 3: the step itself; 1: its MoE layer alone (embedding and head around it), whose
// exchanges are the same but whose working set is half as big (the transfer's footprint factor,
// device_profile.proto transfer_footprint).
inline std::string calibration_model_text(int ranks, int layers = 3) {
  return fmt::format("name: \"moesim-calibration\" transformer {{ layers: {} hidden: 96 heads: 4 ffn_hidden: 192 "
                     "activation: GELU norm: LAYER_NORM bias: true vocab: 96 max_sequence: 48 learned_positions: true "
                     "moe {{ experts: {} top_k: 2 {}}} }}",
                     layers, ranks == 1 ? 4 : 2 * ranks, layers > 1 ? "every_n_layers: 2 moe_layer_offset: 1 " : "");
}

// `sequences` per rank: 8 for the step; 4 for the MoE layer's gathers at half the size.
inline std::string calibration_workload_text(int ranks, int sequences = 8) {
  return fmt::format("name: \"calibration\" training {{ global_batch: {} micro_batch: {} sequence: 48 precision: FP32 "
                     "optimizer: ADAM }}",
                     sequences * ranks, sequences);
}

inline std::string calibration_strategy_text(int ranks) {
  return fmt::format("name: \"calibration\" dp: {} ep: {}", ranks, ranks);
}

}  // namespace moesim::cli
