// End to end: the moesim binary as a user runs it; --json output parsed and checked.
#include "cli/cli.pb.h"
#include "costmodel/collectives.pb.h"
#include "costmodel/cost_report.pb.h"
#include "tests/cli_helpers.h"
#include "topologies/report.pb.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

using namespace moesim;
using namespace moesim::testing;

TEST_CASE("topo show --json carries the derived figures") {
  Run r = moesim_run("topo show configs/hardware/h800-2048.textproto --json");
  REQUIRE(r.exit_code == 0);
  auto rep = parse_json<report::TopologyReport>(r.out);
  CHECK(rep.name() == "h800-2048");
  CHECK(rep.device_count() == 2048);
  CHECK(rep.node_count() == 256);
  CHECK(rep.link_count() > 0);
  CHECK(rep.directed_link_count() == 2 * rep.link_count());
  CHECK(rep.bisection_bandwidth_bps() == Approx(1024 * 50e9));
  CHECK(rep.diameter_hops() == 8);
  REQUIRE(rep.devices_size() == 2048);
  for (const auto& d : rep.devices()) {
    CHECK(d.scaleup_bandwidth_bps() == Approx(200e9));
    CHECK(d.scaleout_bandwidth_bps() == Approx(50e9));
  }
  // Field names as documented: snake case with units.
  CHECK(r.out.find("\"bisection_bandwidth_Bps\"") != std::string::npos);
  CHECK(r.out.find("\"scaleout_bandwidth_Bps\"") != std::string::npos);
  // Routes from device 0 cover every other device.
  int destinations = 0;
  for (const auto& k : rep.routes_from_device0()) destinations += k.destinations();
  CHECK(destinations == 2047);
}

TEST_CASE("topo show prints a table for people") {
  Run r = moesim_run("topo show configs/hardware/dgx-h100.textproto");
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("cluster dgx-h100") != std::string::npos);
  CHECK(r.out.find("450 GB/s") != std::string::npos);
  CHECK(r.err.empty());
}

TEST_CASE("topo show names the collective library's efficiency and rendezvous, as the cluster gives them") {
  std::ifstream f(MOESIM_SOURCE_DIR "/configs/hardware/dgx-h100.textproto");
  std::stringstream text;
  text << f.rdbuf()
       << "\ncollective_efficiency { op: \"all_reduce\" bandwidth_efficiency: 0.5 }\n"
          "rendezvous { eager_limit_bytes: 4096 latency_s: 1.5e-6 }\n";
  const std::string path = write_temp("library.textproto", text.str());
  Run table = moesim_run(fmt::format("topo show '{}'", path));
  REQUIRE(table.exit_code == 0);
  CHECK_THAT(table.out, Catch::Contains("collective library    all_reduce at 0.50 of the links; rendezvous 1.5 us more "
                                        "over 4.1 kB a message (within a node)"));
  Run json = moesim_run(fmt::format("topo show '{}' --json", path));
  REQUIRE(json.exit_code == 0);
  const auto rep = parse_json<report::TopologyReport>(json.out);
  REQUIRE(rep.collective_efficiency_size() == 1);
  CHECK(rep.collective_efficiency(0).bandwidth_efficiency() == 0.5);
  CHECK(rep.rendezvous().eager_limit_bytes() == 4096);
  CHECK(rep.rendezvous().latency_s() == 1.5e-6);
  CHECK_FALSE(rep.has_network_rendezvous());
  // Without them, no such line.
  CHECK_THAT(moesim_run("topo show configs/hardware/dgx-h100.textproto").out,
             !Catch::Contains("collective library"));
  std::filesystem::remove(path);
}

TEST_CASE("topo check: ok on a good file, every problem and exit 2 on a bad one") {
  Run good = moesim_run("topo check configs/hardware/h100-1024.textproto --json");
  REQUIRE(good.exit_code == 0);
  auto ok = parse_json<cli::CheckResult>(good.out);
  CHECK(ok.ok());
  CHECK(ok.device_count() == 1024);

  const std::string bad = write_temp("bad.textproto",
                                     "name: \"bad\"\n"
                                     "nodes: 2\n"
                                     "node {\n"
                                     "  device { preset: \"h100-sxm5\" }\n"
                                     "  devices_per_node: 0\n"
                                     "  intra_fabric: NVSWITCH\n"
                                     "  scaleup_bandwidth_Bps: -5\n"
                                     "  pcie { device_bandwidth_Bps: 64e9 }\n"
                                     "  nic { bandwidth_Bps: 50e9 }\n"
                                     "}\n");
  Run r = moesim_run(fmt::format("topo check '{}'", bad));
  CHECK(r.exit_code == 2);
  CHECK(r.out.empty());
  CHECK(r.err.find(bad + ":5: node.devices_per_node: must be between 1 and 1024, got 0") != std::string::npos);
  CHECK(r.err.find(bad + ":7: node.scaleup_bandwidth_Bps: must be greater than zero, got -5") != std::string::npos);
  CHECK(r.err.find(bad + ":1: fabric: missing required value") != std::string::npos);

  Run j = moesim_run(fmt::format("topo check '{}' --json", bad));
  CHECK(j.exit_code == 2);
  auto res = parse_json<cli::CheckResult>(j.out);
  CHECK_FALSE(res.ok());
  REQUIRE(res.errors_size() == 3);
  CHECK(res.errors(0).line() == 1);
  CHECK(res.errors(1).field() == "node.devices_per_node");
  CHECK(res.errors(1).line() == 5);
  CHECK(res.errors(2).line() == 7);
  std::filesystem::remove(bad);
}

TEST_CASE("topo show on a bad file fails the same way, with nothing on stdout") {
  const std::string bad = write_temp("syntax.textproto", "name: \"x\"\nnodes: 1\nnode { devices_per_node: }\n");
  Run r = moesim_run(fmt::format("topo show '{}'", bad));
  CHECK(r.exit_code == 2);
  CHECK(r.out.empty());
  CHECK(r.err.find(bad + ":3:") != std::string::npos);
  std::filesystem::remove(bad);
  Run missing = moesim_run("topo show no/such/file.textproto");
  CHECK(missing.exit_code == 2);
  CHECK(missing.err.find("no/such/file.textproto: cannot open file") != std::string::npos);
}

TEST_CASE("topo route spells out a route hop by hop") {
  Run r = moesim_run("topo route configs/hardware/h800-2048.textproto --from node0.gpu0 --to 1603 --paths 3 --json");
  REQUIRE(r.exit_code == 0);
  auto route = parse_json<report::RouteReport>(r.out);
  CHECK(route.from() == "node0.gpu0");
  CHECK(route.to() == "node200.gpu3");  // rank 1603 = node 200, GPU 3
  CHECK(route.hops() == 8);
  CHECK(route.ecmp_paths() == 32);  // one per spine
  REQUIRE(route.paths_size() == 3);
  for (const auto& p : route.paths()) {
    REQUIRE(p.hops_size() == 8);
    CHECK(p.hops(3).vertex().rfind("spine", 0) == 0);
    CHECK(p.hops(7).vertex() == "node200.gpu3");
    CHECK(p.hops(2).link_kind() == "NETWORK");
  }
  CHECK(route.paths(0).hops(3).vertex() != route.paths(1).hops(3).vertex());

  Run bad = moesim_run("topo route configs/hardware/h800-2048.textproto --from node0.gpu0 --to node900.gpu3");
  CHECK(bad.exit_code == 2);
  CHECK(bad.err.find("no device 'node900.gpu3'") != std::string::npos);
  CHECK(moesim_run("topo route configs/hardware/h800-2048.textproto --from 0").exit_code == 2);
}

TEST_CASE("topo dot draws every physical link once") {
  Run r = moesim_run("topo dot configs/hardware/dgx-h100.textproto");
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.rfind("digraph \"dgx-h100\" {", 0) == 0);
  Run show = moesim_run("topo show configs/hardware/dgx-h100.textproto --json");
  auto rep = parse_json<report::TopologyReport>(show.out);
  size_t edges = 0;
  for (size_t p = 0; (p = r.out.find(" -> ", p)) != std::string::npos; ++p) ++edges;
  CHECK(edges == static_cast<size_t>(rep.link_count()));
  CHECK(r.out.find("subgraph \"cluster_node0\"") != std::string::npos);
}

TEST_CASE("list shows the registries") {
  Run r = moesim_run("list --json");
  REQUIRE(r.exit_code == 0);
  auto list = parse_json<cli::ListResult>(r.out);
  bool fat_tree = false, h100 = false;
  for (const auto& reg : list.registries())
    for (const auto& e : reg.entries()) {
      CHECK_FALSE(e.description().empty());
      fat_tree |= e.name() == "fat_tree";
      h100 |= e.name() == "h100-sxm5";
    }
  CHECK(fat_tree);
  CHECK(h100);
  bool zipf = false;
  for (const auto& reg : list.registries())
    for (const auto& e : reg.entries()) zipf |= reg.kind() == "routing distribution" && e.name() == "zipf";
  CHECK(zipf);
  Run text = moesim_run("list");
  CHECK(text.out.find("rail_optimized") != std::string::npos);
}

TEST_CASE("every command has --help, and usage errors exit 2") {
  for (const char* cmd : {"topo show", "topo route", "topo check", "topo dot", "list", "collective", "model show", "memory",
                          "run", "bench-layer"}) {
    Run r = moesim_run(fmt::format("{} --help", cmd));
    INFO(cmd);
    CHECK(r.exit_code == 0);
    CHECK(r.out.find("usage: moesim") != std::string::npos);
  }
  CHECK(moesim_run("--help").exit_code == 0);
  CHECK(moesim_run("").exit_code == 2);
  CHECK(moesim_run("frobnicate").exit_code == 2);
  CHECK(moesim_run("topo").exit_code == 2);
  Run unknown = moesim_run("topo show configs/hardware/dgx-h100.textproto --colour");
  CHECK(unknown.exit_code == 2);
  CHECK(unknown.err.find("unknown option --colour") != std::string::npos);
  Run threads = moesim_run("topo show configs/hardware/dgx-h100.textproto --threads lots");
  CHECK(threads.exit_code == 2);
  CHECK(moesim_run("topo show").exit_code == 2);
}

TEST_CASE("collective: the alpha-beta cost of a collective, as JSON or a table, and bad input exits 2") {
  Run r = moesim_run("collective --cluster configs/hardware/dgx-h100.textproto --op all_reduce --bytes 64MiB --ranks 0-7 --json");
  REQUIRE(r.exit_code == 0);
  auto rep = parse_json<report::CollectiveReport>(r.out);
  CHECK(rep.cluster() == "dgx-h100");
  CHECK(rep.op() == "all_reduce");
  CHECK(rep.algorithm() == "ring");  // the default
  CHECK(rep.ranks() == 8);
  CHECK(rep.nodes() == 1);
  CHECK(rep.rank_list_size() == 8);
  const double S = 64.0 * 1024 * 1024;
  CHECK(rep.size_bytes() == S);
  // Ring: 2(n-1) steps of S/n over NVSwitch (450 GB/s, 2 us device to device).
  CHECK(rep.steps() == 14);
  CHECK(rep.time_s() == Approx(14 * (rep.step_overhead_s() + 2e-6 + S / 8 / 450e9)));
  CHECK(rep.time_s() == Approx(rep.latency_s() + rep.transfer_s()));
  CHECK(rep.alg_bw_bps() == Approx(S / rep.time_s()));
  CHECK(rep.bus_factor() == Approx(2.0 * 7 / 8));
  CHECK(rep.bus_factor_formula() == "2(n-1)/n");
  CHECK(rep.bus_bw_bps() == Approx(rep.alg_bw_bps() * 14 / 8));
  CHECK(r.out.find("\"bus_bw_Bps\"") != std::string::npos);

  Run h = moesim_run("collective --cluster configs/hardware/h800-2048.textproto --op all_to_all --bytes 1MB "
                     "--ranks 0-7,16-23 --algo hierarchical --json");
  REQUIRE(h.exit_code == 0);
  auto hier = parse_json<report::CollectiveReport>(h.out);
  CHECK(hier.algorithm() == "hierarchical");
  CHECK(hier.ranks() == 16);
  CHECK(hier.nodes() == 2);
  CHECK(hier.rank_list(8) == 16);
  CHECK(hier.steps() == 7 + 1);
  CHECK(hier.size_bytes() == 1e6);

  Run table = moesim_run("collective --cluster configs/hardware/dgx-h100.textproto --op all_to_all --bytes 1GB");
  REQUIRE(table.exit_code == 0);
  CHECK(table.out.find("algorithm  direct") != std::string::npos);
  CHECK(table.out.find("busBw") != std::string::npos);
  CHECK(table.out.find("(n-1)/n") != std::string::npos);

  const std::string dgx = "collective --cluster configs/hardware/dgx-h100.textproto --op all_reduce ";
  Run bytes = moesim_run(dgx + "--bytes 12XB");
  CHECK(bytes.exit_code == 2);
  CHECK(bytes.err.find("--bytes: expected a positive size") != std::string::npos);
  CHECK(bytes.out.empty());
  for (const char* bad : {"--bytes -5", "--bytes 0", "--bytes nan", "--bytes MiB", "--bytes 64MiB --op frob",
                          "--bytes 1MB --ranks 1", "--bytes 1MB --ranks 0-99", "--bytes 1MB --ranks 3,3",
                          "--bytes 1MB --ranks 0-", "--bytes 1MB --algo hierarchical", "--bytes 1MB --step-overhead -1"}) {
    INFO(bad);
    Run b = moesim_run(dgx + bad);
    CHECK(b.exit_code == 2);
    CHECK_FALSE(b.err.empty());
  }
  Run one_node = moesim_run(
      "collective --cluster configs/hardware/dgx-h100.textproto --op all_to_all --algo hierarchical --bytes 1MB");
  CHECK(one_node.exit_code == 2);
  CHECK(one_node.err.find("at least 2 nodes") != std::string::npos);
  Run missing = moesim_run("collective --cluster no/such.textproto --op all_reduce --bytes 1MB");
  CHECK(missing.exit_code == 2);
  CHECK(missing.err.find("no/such.textproto: cannot open file") != std::string::npos);
  CHECK(moesim_run("collective --op all_reduce --bytes 1MB").exit_code == 2);

  Run list = moesim_run("list");
  CHECK(list.out.find("collective algorithms:") != std::string::npos);
  CHECK(list.out.find("all_to_all.hierarchical") != std::string::npos);
}

TEST_CASE("model show: totals and a layers list as JSON, a table for people") {
  Run r = moesim_run("model show configs/models/mixtral-8x7b.textproto --json");
  REQUIRE(r.exit_code == 0);
  auto m = parse_json<report::ModelReport>(r.out);
  CHECK(m.name() == "mixtral-8x7b");
  CHECK(m.total_params() == Approx(46.7e9).epsilon(0.01));   // Mistral AI: 46.7B total
  CHECK(m.active_params() == Approx(12.9e9).epsilon(0.01));  // 12.9B active
  CHECK(m.has_flops_per_token_fwd());
  CHECK_FALSE(m.has_flops_per_sample_fwd());
  CHECK(m.layers_size() == 34);  // embedding, 32 layers, head
  double sum = 0;
  for (const auto& l : m.layers()) sum += l.params();
  CHECK(sum == Approx(m.total_params()));
  // 2 FLOPs per active non-embedding parameter plus attention: between 2N and 2.2N.
  CHECK(m.flops_per_token_fwd() > 2 * (m.active_params() - m.embedding_params()));
  CHECK(m.flops_per_token_fwd() < 2.2 * m.active_params());
  // A longer sequence costs more attention FLOPs per token.
  auto longer = parse_json<report::ModelReport>(moesim_run("model show configs/models/mixtral-8x7b.textproto --sequence 32768 --json").out);
  CHECK(longer.flops_per_token_fwd() > m.flops_per_token_fwd());

  // DeepSeek-V3 Technical Report: 37B activated, counted without the input embedding table.
  auto ds = parse_json<report::ModelReport>(moesim_run("model show configs/models/deepseek-v3.textproto --json").out);
  CHECK(ds.active_params_without_embedding() == Approx(37e9).margin(0.5e9));
  CHECK(ds.active_params_without_embedding() == Approx(ds.active_params() - ds.embedding_params()));

  auto cnn = parse_json<report::ModelReport>(moesim_run("model show configs/models/resnet50.textproto --json").out);
  CHECK(cnn.counted_per() == "sample");
  CHECK(cnn.has_flops_per_sample_fwd());
  CHECK(r.out.find("\"flops_per_sample_fwd\"") == std::string::npos);

  Run table = moesim_run("model show configs/models/deepseek-v3.textproto");
  REQUIRE(table.exit_code == 0);
  CHECK(table.out.find("L3-60 x58") != std::string::npos);  // identical MoE layers share a row
  CHECK(table.out.find("total parameters     671B") != std::string::npos);

  const std::string bad = write_temp("bad_model.textproto", "name: \"m\"\ntransformer {\n  layers: 2 hidden: 100 heads: 3\n}\n");
  Run b = moesim_run("model show " + bad);
  CHECK(b.exit_code == 2);
  CHECK(b.err.find("bad_model.textproto:3: transformer.heads:") != std::string::npos);
  CHECK(b.out.empty());
  CHECK(moesim_run("model show").exit_code == 2);
  CHECK(moesim_run("model show configs/models/missing.textproto").exit_code == 2);
}

TEST_CASE("memory: per-rank parts and whether it fits") {
  const std::string args =
      "memory --cluster configs/hardware/h800-2048.textproto --model configs/models/deepseek-v3.textproto "
      "--workload configs/workloads/deepseek-v3-pretrain.textproto "
      "--strategy configs/strategies/deepseek-v3-published.textproto";
  Run r = moesim_run(args + " --json");
  REQUIRE(r.exit_code == 0);
  auto m = parse_json<report::MemoryReport>(r.out);
  CHECK(m.rank_count() == 2048);
  CHECK(m.pp() == 16);
  CHECK(m.ep() == 64);
  CHECK(m.micro_batches() == 120);  // 15360 / (128 x 1)
  // The groups cover every rank once; a group never mixes pipeline stages (16 stages, >= 16 groups).
  std::vector<int> covered(2048, 0);
  CHECK(m.ranks_size() >= 16);
  for (const auto& x : m.ranks()) {
    for (int rank : x.rank_list()) {
      ++covered[rank];
      CHECK(rank / 128 == x.stage());  // ranks: dp fastest, then pp
    }
    CHECK(x.total_bytes() == Approx(x.weights_bytes() + x.gradients_bytes() + x.optimizer_bytes() + x.activations_bytes() +
                                    x.moe_buffers_bytes() + x.comm_buffers_bytes() + x.kv_cache_bytes()));
    CHECK(x.capacity_bytes() == 80e9);  // H800: 80 GB HBM3
    CHECK(x.fits() == (x.total_bytes() <= x.capacity_bytes()));
  }
  CHECK(std::count(covered.begin(), covered.end(), 1) == 2048);
  CHECK(m.fits());
  bool peak_found = false;
  for (const auto& x : m.ranks())
    if (std::find(x.rank_list().begin(), x.rank_list().end(), m.peak_rank()) != x.rank_list().end()) {
      peak_found = true;
      CHECK(m.peak_total_bytes() == Approx(x.total_bytes()));
    }
  CHECK(peak_found);

  Run table = moesim_run(args);
  REQUIRE(table.exit_code == 0);
  CHECK(table.out.find("fits: peak rank") != std::string::npos);

  // Bad input: every file's problems, exit 2, nothing on stdout.
  const std::string strategy = write_temp("bad_strategy.textproto", "name: \"s\"\ndp: 64\ntp: 3\n");
  Run b = moesim_run(
      "memory --cluster configs/hardware/h100-64.textproto --model configs/models/mixtral-8x7b.textproto "
      "--workload configs/workloads/mixtral-8x7b-train.textproto --strategy " + strategy);
  CHECK(b.exit_code == 2);
  CHECK(b.err.find("bad_strategy.textproto:2: dp:") != std::string::npos);
  CHECK(b.err.find("bad_strategy.textproto:3: tp:") != std::string::npos);
  CHECK(b.out.empty());
  CHECK(moesim_run("memory --cluster configs/hardware/h100-64.textproto").exit_code == 2);  // missing files

  // A scenario names the same four files: the same figures, as `simulate` takes it; a scenario and
  // the four files at once, or two scenarios, are refused.
  const Run four = moesim_run(
      "memory --cluster configs/hardware/h100-64.textproto --model configs/models/mixtral-8x7b.textproto "
      "--workload configs/workloads/mixtral-8x7b-train.textproto --strategy configs/strategies/mixtral-8x7b-megatron.textproto "
      "--json");
  const Run scenario = moesim_run("memory configs/scenarios/mixtral-8x7b-h100.textproto --json");
  REQUIRE(four.exit_code == 0);
  REQUIRE(scenario.exit_code == 0);
  const auto peak = [](const Run& r) { return parse_json<report::MemoryReport>(r.out).peak_total_bytes(); };
  CHECK(peak(scenario) == peak(four));
  CHECK(peak(scenario) > 0);
  CHECK(moesim_run("memory configs/scenarios/mixtral-8x7b-h100.textproto --cluster configs/hardware/h100-64.textproto")
            .exit_code == 2);
  CHECK(moesim_run("memory configs/scenarios/mixtral-8x7b-h100.textproto configs/scenarios/vmoe-b16-a100.textproto")
            .exit_code == 2);
}

TEST_CASE("run: moe-tiny trains on one rank, per-step loss and step time as JSON") {
  Run r = moesim_run("run --model configs/models/moe-tiny.textproto --steps 30 --json");
  REQUIRE(r.exit_code == 0);
  auto out = parse_json<cli::RunResult>(r.out);
  CHECK(out.ranks() == 1);
  REQUIRE(out.steps_size() == 30);
  for (const auto& s : out.steps()) CHECK(s.step_time_s() > 0);
  CHECK(out.steps(29).loss() < 0.8 * out.steps(0).loss());
  CHECK(out.tokens_per_step() == 8 * 32);  // 8 sequences of moe-tiny's 32 tokens
  CHECK(out.tokens_per_s() > 0);
}

TEST_CASE("run: two ranks under mpirun, experts split over both, trace and store written") {
  const std::string trace = write_temp("run_trace.json", "");
  const std::string db = write_temp("run.db", "");
  std::filesystem::remove(db);
  Run r = moesim_run(fmt::format("run --model configs/models/moe-tiny.textproto --ranks 2 --steps 3 --json --trace {} --db {}",
                                 trace, db));
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  auto out = parse_json<cli::RunResult>(r.out);  // rank 0 alone prints
  CHECK(out.ranks() == 2);
  CHECK(out.dp() == 2);
  CHECK(out.ep() == 2);
  CHECK(out.steps_size() == 3);
  CHECK_FALSE(out.run_id().empty());
  CHECK(std::filesystem::file_size(db) > 0);
  std::ifstream in(trace);
  std::stringstream ss;
  ss << in.rdbuf();
  // Both ranks' spans, with the Schedule-style op ids.
  CHECK(ss.str().find("\"pid\":1") != std::string::npos);
  CHECK(ss.str().find("L0.moe.dispatch_a2a mb0 fwd") != std::string::npos);
}

TEST_CASE("bench-layer: tokens/s and its parts as JSON") {
  Run r = moesim_run("bench-layer --experts 4 --top-k 2 --tokens 512 --hidden 64 --ffn 128 --iterations 2 --json");
  REQUIRE(r.exit_code == 0);
  auto b = parse_json<cli::BenchLayerResult>(r.out);
  CHECK(b.tokens() == 512);
  CHECK(b.tokens_per_s() == Approx(512 / b.step_s()));
  CHECK(b.gate_s() > 0);
  CHECK(b.experts_s() > 0);
  CHECK(b.gate_s() + b.dispatch_s() + b.experts_s() + b.combine_s() <= b.step_s() * 1.01);
  CHECK(b.gemm_efficiency_vs_blas() > 0);
}

TEST_CASE("run --plan: a plan's model, strategy, batch and seed on the plan's ranks") {
  const std::string dir = (std::filesystem::temp_directory_path() / fmt::format("cli_test_plan_{}", ::getpid())).string();
  std::filesystem::create_directories(dir);
  std::ofstream(dir + "/two.textproto") << "name: \"two\" nodes: 1 node { device { preset: \"h100-sxm5\" } devices_per_node: 2 "
                                           "intra_fabric: NVSWITCH scaleup_bandwidth_Bps: 450e9 pcie { device_bandwidth_Bps: 64e9 } }\n";
  std::ofstream(dir + "/tiny.workload.textproto")
      << "name: \"tiny\" training { global_batch: 4 micro_batch: 1 sequence: 16 precision: FP32 }\n";
  std::ofstream(dir + "/p.plan.textproto") << fmt::format(
      "cluster: \"two.textproto\"\nmodel: \"{}/configs/models/moe-tiny.textproto\"\nworkload: \"tiny.workload.textproto\"\n"
      "strategy {{ name: \"dp2-ep2\" dp: 2 ep: 2 drop_policy: NO_DROP }}\nseed: 5\n",
      MOESIM_SOURCE_DIR);
  Run r = moesim_run(fmt::format("run --plan {}/p.plan.textproto --steps 2 --json", dir));
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  auto out = parse_json<cli::RunResult>(r.out);
  CHECK(out.ranks() == 2);  // the plan's devices
  CHECK(out.dp() == 2);
  CHECK(out.ep() == 2);
  CHECK(out.tokens_per_step() == 4 * 16);  // the plan's workload
  CHECK(out.steps_size() == 2);
  // A plan with a strategy the executor cannot run, and --plan with --model, are refused.
  std::ofstream(dir + "/tp.plan.textproto") << fmt::format(
      "cluster: \"two.textproto\"\nmodel: \"{}/configs/models/moe-tiny.textproto\"\nworkload: \"tiny.workload.textproto\"\n"
      "strategy {{ name: \"tp2\" tp: 2 dp: 1 }}\n",
      MOESIM_SOURCE_DIR);
  Run tp = moesim_run(fmt::format("run --plan {}/tp.plan.textproto", dir));
  CHECK(tp.exit_code == 2);
  CHECK(tp.err.find("tp 1, pp 1") != std::string::npos);
  CHECK(moesim_run(fmt::format("run --plan {}/p.plan.textproto --model configs/models/moe-tiny.textproto", dir)).exit_code == 2);
  std::filesystem::remove_all(dir);
}

TEST_CASE("run and bench-layer: bad input exits 2 before any rank starts") {
  Run gqa = moesim_run("run --model configs/models/mixtral-8x7b.textproto --steps 1");
  CHECK(gqa.exit_code == 2);
  CHECK(gqa.err.find("GQA and MLA models are not supported") != std::string::npos);
  CHECK(gqa.out.empty());
  Run nompi = moesim_run("run --model configs/models/moe-tiny.textproto --ranks 2 --steps 1", "MOESIM_MPIRUN=/nonexistent/mpirun");
  CHECK(nompi.exit_code == 2);
  CHECK(nompi.err.find("cannot start /nonexistent/mpirun") != std::string::npos);
  Run topk = moesim_run("bench-layer --experts 4 --top-k 5");
  CHECK(topk.exit_code == 2);
  Run split = moesim_run("bench-layer --tokens 1001 --ranks 2");
  CHECK(split.exit_code == 2);
  CHECK(split.err.find("does not split evenly") != std::string::npos);
  Run batch = moesim_run("run --model configs/models/moe-tiny.textproto --ranks 2 --batch 3");
  CHECK(batch.exit_code == 2);
  Run strategy = moesim_run("run --model configs/models/moe-tiny.textproto --strategy configs/strategies/reid-dp8.textproto");
  CHECK(strategy.exit_code == 2);
  CHECK(strategy.err.find("dp 8 but 1 ranks") != std::string::npos);
  CHECK(moesim_run("run --model configs/models/missing.textproto").exit_code == 2);
  Run cuda = moesim_run("bench-layer --device cuda");
  CHECK(cuda.exit_code == 2);
  // Refused plainly on this machine: either the build has no CUDA or there is no device.
  CHECK(cuda.err.find("--device cuda") != std::string::npos);
  // The suite likewise, before it writes anything (its --out stays absent).
  const std::string out = (std::filesystem::temp_directory_path() / fmt::format("cli-suite-cuda-{}", ::getpid())).string();
  Run suite = moesim_run("validate --suite --device cuda --cluster configs/hardware/dgx-a100.textproto --out " + out);
  CHECK(suite.exit_code == 2);
  CHECK(suite.err.find("--device cuda") != std::string::npos);
  CHECK(!std::filesystem::exists(out));
  // Inside a launch of 2 ranks, --ranks 3 is refused by every rank.
  Run launch = moesim_run("run --model configs/models/moe-tiny.textproto --ranks 3", "",
                          fmt::format("'{}' --allow-run-as-root --oversubscribe -np 2", MOESIM_MPIEXEC));
  CHECK(launch.exit_code != 0);
  CHECK(launch.err.find("this launch has 2 ranks but --ranks is 3") != std::string::npos);
}
