// Catalogue of bad model, workload and strategy configs, on their own and together. Each case
// breaks one thing in a known-good config and checks the diagnostic: file, line, field path and
// the gist of the message.
#include "costmodel/setup.h"
#include "temp_dir.h"
#include "test_diagnostics.h"

#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>
#include <unistd.h>

namespace moesim::cost {
namespace {

const std::string kSource = MOESIM_SOURCE_DIR;

struct Expect {
  int line;
  std::string field;
  std::string message;  // a substring of the message
};

// Runs `load` and checks that it throws a ConfigError containing `e` in file `file`.
template <typename Load>
void expect_error(Load load, const std::string& file, const Expect& e) {
  const std::vector<Diagnostic> diagnostics = test::diagnostics_of(load, e.field);
  bool found = false;
  for (const Diagnostic& d : diagnostics)
    found |= d.file.find(file) != std::string::npos && d.line == e.line && d.field_path == e.field &&
             d.message.find(e.message) != std::string::npos;
  INFO("wanted " << file << ":" << e.line << ": " << e.field << ": ..." << e.message << "...; got:\n"
                 << test::describe(diagnostics));
  CHECK(found);
}

// A valid MoE transformer, one field per line so that each case can replace a line.
std::vector<std::string> model_lines() {
  return {
      /*  1 */ "name: \"m\"",
      /*  2 */ "transformer {",
      /*  3 */ "  layers: 4",
      /*  4 */ "  hidden: 256",
      /*  5 */ "  heads: 4",
      /*  6 */ "  ffn_hidden: 1024",
      /*  7 */ "  activation: GELU",
      /*  8 */ "  vocab: 1000",
      /*  9 */ "  moe {",
      /* 10 */ "    experts: 8",
      /* 11 */ "    top_k: 2",
      /* 12 */ "  }",
      /* 13 */ "}",
  };
}

std::string join(const std::vector<std::string>& lines) {
  std::string out;
  for (const std::string& l : lines) out += l + "\n";
  return out;
}

std::string with(std::vector<std::string> lines, int line, const std::string& text) {
  lines.at(line - 1) = text;
  return join(lines);
}

void bad_model(const std::string& text, const Expect& e) {
  expect_error([&] { load_model_text(text, "m.textproto"); }, "m.textproto", e);
}

TEST_CASE("The base configs of this catalogue are valid") {
  CHECK_NOTHROW(load_model_text(join(model_lines()), "m.textproto"));
}

TEST_CASE("Bad models") {
  const auto base = model_lines();
  SECTION("heads not dividing hidden") {
    bad_model(with(base, 5, "  heads: 3"), {5, "transformer.heads", "must divide hidden (256)"});
  }
  SECTION("kv heads not dividing heads") {
    bad_model(with(base, 5, "  heads: 4 kv_heads: 3"), {5, "transformer.kv_heads", "must divide heads (4)"});
  }
  SECTION("top-k above the experts") {
    bad_model(with(base, 11, "    top_k: 9"), {11, "transformer.moe.top_k", "cannot exceed experts (8)"});
  }
  SECTION("no experts") { bad_model(with(base, 10, ""), {9, "transformer.moe.experts", "missing required value"}); }
  SECTION("MLA without its ranks") {
    bad_model(with(base, 5, "  heads: 4 attention: MLA"), {2, "transformer.mla", "missing required value"});
  }
  SECTION("MoE layer offset outside the period") {
    bad_model(with(base, 11, "    top_k: 2 every_n_layers: 2 moe_layer_offset: 2"),
              {11, "transformer.moe.moe_layer_offset", "between 0 and every_n_layers - 1"});
  }
  SECTION("a language model without a vocabulary") {
    bad_model(with(base, 8, ""), {2, "transformer.vocab", "missing required value"});
  }
  SECTION("an unknown activation is a parse error on its line") {
    bad_model(with(base, 7, "  activation: SWISH"), {7, "", "SWISH"});
  }
  SECTION("no architecture") { bad_model("name: \"m\"\n", {1, "", "one of transformer, resnet or reid"}); }
  SECTION("image size not a multiple of the patch size") {
    bad_model(with(base, 8, "  vision { image_size: 225 patch_size: 16 }"),
              {8, "transformer.vision.image_size", "not a multiple of patch_size 16"});
  }
  SECTION("pMoE: more patches per expert than an image has") {
    bad_model(join({"name: \"p\"", "transformer {", "  layers: 2 hidden: 64 heads: 2 ffn_hidden: 128 activation: GELU",
                    "  vision { image_size: 32 patch_size: 16 }", "  moe { experts: 2",
                    "    patch_routing { patches_per_expert: 5 } }", "}"}),
              {6, "transformer.moe.patch_routing.patches_per_expert", "more than the 4 patches"});
  }
  SECTION("a ResNet input smaller than its total stride") {
    bad_model(join({"name: \"r\"", "resnet {", "  stage { blocks: 1 width: 8 }", "  stage { blocks: 1 width: 8 }",
                    "  input_height: 4", "}"}),
              {5, "resnet.input_height", "vanish under the network's total stride 8"});
  }
  SECTION("a ResNet stride of 3") {
    bad_model(join({"name: \"r\"", "resnet {", "  stage { blocks: 1 width: 8 stride: 3 }", "}"}),
              {3, "resnet.stage[0].stride", "must be 1 or 2"});
  }
}

TEST_CASE("Every problem of a model is reported, in line order") {
  auto lines = model_lines();
  lines[4] = "  heads: 3";      // line 5
  lines[10] = "    top_k: 9";   // line 11
  try {
    load_model_text(join(lines), "m.textproto");
    FAIL("no error");
  } catch (const ConfigError& e) {
    REQUIRE(e.diagnostics().size() == 2);
    CHECK(e.diagnostics()[0].line == 5);
    CHECK(e.diagnostics()[1].line == 11);
  }
}

TEST_CASE("Bad workloads and strategies on their own") {
  auto workload = [](const std::string& text, const Expect& e) {
    expect_error([&] { load_workload_text(text, "w.textproto"); }, "w.textproto", e);
  };
  auto strategy = [](const std::string& text, const Expect& e) {
    expect_error([&] { load_strategy_text(text, "s.textproto"); }, "s.textproto", e);
  };
  workload("name: \"w\"\ntraining {\n  global_batch: 8\n  micro_batch: 16\n}\n",
           {4, "training.micro_batch", "exceeds global_batch (8)"});
  workload("name: \"w\"\n", {1, "", "training { ... } or inference { ... }"});
  workload("name: \"w\"\ninference {\n  batch: 0\n  prompt_tokens: 10 generated_tokens: 1\n}\n",
           {3, "inference.batch", "between 1 and"});
  strategy("name: \"s\"\ncapacity_factor: 0\n", {2, "capacity_factor", "greater than zero"});
  strategy("name: \"s\"\ncapacity_factor: -1.5\n", {2, "capacity_factor", "greater than zero"});
  strategy("name: \"s\"\nzero_stage: 4\n", {2, "zero_stage", "between 0 and 3"});
  strategy("name: \"s\"\nschedule: INTERLEAVED_1F1B\n", {1, "virtual_stages", "needs virtual_stages of 2 or more"});
  strategy("name: \"s\"\noffload { expert_fraction: 1.5 }\n", {2, "offload.expert_fraction", "between 0 and 1"});
  strategy("name: \"s\"\ndp: 0\n", {2, "dp", "between 1 and"});
}

// The four files together: the strategy must fit the cluster, model and workload.
class Together {
 public:
  Together() : dir_(test::process_temp_dir()) {
    model_ = write("m.textproto", join(model_lines()));
    workload_ = write("w.textproto", "name: \"w\"\ntraining {\n  global_batch: 16\n  micro_batch: 1\n  sequence: 64\n}\n");
  }
  std::string write(const std::string& name, const std::string& text) const {
    const auto path = (dir_ / name).string();
    std::ofstream(path) << text;
    return path;
  }
  // dgx-h100: 8 devices.
  void expect(const std::string& strategy_text, const std::string& file, const Expect& e,
              const std::string& workload_text = "") const {
    const std::string s = write("s.textproto", strategy_text);
    const std::string w = workload_text.empty() ? workload_ : write("w2.textproto", workload_text);
    expect_error([&] { load_setup(kSource + "/configs/hardware/dgx-h100.textproto", model_, w, s); }, file, e);
  }
  void ok(const std::string& strategy_text) const {
    const std::string s = write("s.textproto", strategy_text);
    CHECK_NOTHROW(load_setup(kSource + "/configs/hardware/dgx-h100.textproto", model_, workload_, s));
  }

 private:
  std::filesystem::path dir_;
  std::string model_, workload_;
};

TEST_CASE("Bad layouts: the strategy against cluster, model and workload") {
  const Together t;
  t.ok("name: \"s\"\ndp: 8\nep: 8\n");
  SECTION("degrees not matching the device count") {
    t.expect("name: \"s\"\ndp: 4\n", "s.textproto", {2, "dp", "= 4 ranks, but the cluster has 8 devices"});
  }
  SECTION("EP not dividing the experts") {
    t.expect("name: \"s\"\ndp: 8\nep: 3\n", "s.textproto", {3, "ep", "must divide the model's 8 experts"});
  }
  SECTION("EP not dividing DP") {
    t.expect("name: \"s\"\ndp: 2\ntp: 4\nep: 4\n", "s.textproto", {4, "ep", "must divide dp (2)"});
  }
  SECTION("TP not dividing the heads") {
    t.expect("name: \"s\"\ndp: 1\ntp: 8\n", "s.textproto", {3, "tp", "must divide the model's 4 attention heads"});
  }
  SECTION("more pipeline stages than layers") {
    t.expect("name: \"s\"\ndp: 1\npp: 8\n", "s.textproto", {3, "pp", "exceeds the model's 4 layers"});
  }
  SECTION("micro-batches not dividing the batch") {
    t.expect("name: \"s\"\ndp: 8\nmicro_batches: 3\n", "s.textproto",
             {3, "micro_batches", "= 24, but global_batch is 16"});
  }
  SECTION("a global batch that DP x micro-batch does not divide") {
    t.expect("name: \"s\"\ndp: 8\n", "w2.textproto", {3, "training.global_batch", "not a multiple of dp x micro_batch"},
             "name: \"w\"\ntraining {\n  global_batch: 12\n}\n");
  }
  SECTION("an expert placed on a rank outside the EP group") {
    t.expect("name: \"s\"\ndp: 8\nep: 2\nplacement {\n  expert_rank: [0, 0, 0, 0, 1, 1, 1, 2]\n}\n", "s.textproto",
             {5, "placement.expert_rank[7]", "EP rank 2 is outside 0..1"});
  }
  SECTION("a routing histogram of the wrong length") {
    t.expect("name: \"s\"\ndp: 8\n", "w2.textproto", {4, "routing.histogram.weight", "8"},
             "name: \"w\"\ntraining { global_batch: 16 }\nrouting {\n  histogram { weight: [1, 2] }\n}\n");
  }
}

TEST_CASE("Problems of every file are reported together") {
  const Together t;
  const std::string bad_model = t.write("bm.textproto", with(model_lines(), 5, "  heads: 3"));
  const std::string bad_strategy = t.write("bs.textproto", "name: \"s\"\ncapacity_factor: 0\n");
  try {
    load_setup(kSource + "/configs/hardware/dgx-h100.textproto", bad_model, t.write("w.textproto", "name: \"w\"\n"),
               bad_strategy);
    FAIL("no error");
  } catch (const ConfigError& e) {
    std::vector<std::string> files;
    for (const Diagnostic& d : e.diagnostics()) files.push_back(std::filesystem::path(d.file).filename().string());
    CHECK(files == std::vector<std::string>{"bm.textproto", "w.textproto", "bs.textproto"});
  }
}

}  // namespace
}  // namespace moesim::cost
