#include "costmodel/setup.h"

#include "costmodel/routing_model.h"

#include <fmt/format.h>

#include <numeric>

namespace moesim::cost {
namespace {

constexpr double kMaxLayers = 10000;
constexpr double kMaxWidth = 1 << 20;
constexpr double kMaxHeads = 1 << 16;
constexpr double kMaxExperts = 1 << 20;
constexpr double kMaxVocab = 1 << 24;
constexpr double kMaxSequence = 1 << 24;
constexpr double kMaxImage = 1 << 16;
constexpr double kMaxBatch = 1e12;
constexpr double kMaxDegree = 1 << 20;

template <typename T>
Loaded<T> parse(const std::string& path, const std::string* text, void (*validate)(const ConfigScope&)) {
  Loaded<T> l{std::make_unique<T>(), nullptr};
  l.doc = std::make_unique<ConfigDocument>(text ? ConfigDocument::parse_text(*text, path, l.msg.get())
                                                : ConfigDocument::parse_file(path, l.msg.get()));
  Diagnostics diags;
  validate(l.doc->root(&diags));
  diags.throw_if_any();
  return l;
}

// An enum written as its UNSPECIFIED value.
void no_unspecified(const ConfigScope& s, std::string_view field, const char* choices) {
  if (s.has(field) && s.number(field) == 0) s.error(field, fmt::format("choose one of {}", choices));
}

// ---------------------------------------------------------------------------------------------
// Model.

void validate_resnet(const ConfigScope& s) {
  const auto& r = static_cast<const model::ResNet&>(s.message());
  if (r.stage_size() == 0) s.error("stage", "a ResNet needs at least one stage");
  int downsample = 4;  // stem conv /2 and max pool /2
  bool ok = true;
  for (int i = 0; i < r.stage_size(); ++i) {
    ConfigScope st = s.child("stage", i);
    st.in_range("blocks", 1, 1000, Need::kRequired);
    ok &= st.in_range("width", 1, kMaxWidth, Need::kRequired);
    if (st.has("stride") && r.stage(i).stride() != 1 && r.stage(i).stride() != 2)
      st.error("stride", fmt::format("must be 1 or 2, got {}", r.stage(i).stride()));
    downsample *= (r.stage(i).has_stride() ? r.stage(i).stride() : i == 0 ? 1 : 2);
  }
  if (s.has("last_stride") && r.last_stride() != 1 && r.last_stride() != 2)
    s.error("last_stride", fmt::format("must be 1 or 2, got {}", r.last_stride()));
  s.in_range("stem_width", 1, kMaxWidth, Need::kOptional);
  s.in_range("channels", 1, 1024, Need::kOptional);
  s.in_range("classes", 0, kMaxVocab, Need::kOptional);
  for (const char* f : {"input_height", "input_width"}) {
    if (!s.in_range(f, 1, kMaxImage, Need::kOptional) || !ok) continue;
    const int v = static_cast<int>(s.number(f) ? s.number(f) : 224);
    if (v < downsample)
      s.error(f, fmt::format("{} pixels vanish under the network's total stride {}: give at least {}", v, downsample,
                             downsample));
  }
}

void validate_transformer(const ConfigScope& s) {
  const auto& t = static_cast<const model::Transformer&>(s.message());
  const bool layers_ok = s.in_range("layers", 1, kMaxLayers, Need::kRequired);
  s.in_range("encoder_layers", 0, kMaxLayers, Need::kOptional);
  const bool hidden_ok = s.in_range("hidden", 1, kMaxWidth, Need::kRequired);
  const bool heads_ok = s.in_range("heads", 1, kMaxHeads, Need::kRequired);
  if (heads_ok && s.in_range("kv_heads", 1, kMaxHeads, Need::kOptional) && t.heads() % t.kv_heads() != 0)
    s.error("kv_heads", fmt::format("must divide heads ({}), got {}", t.heads(), t.kv_heads()));
  if (s.has("head_dim")) {
    s.in_range("head_dim", 1, kMaxWidth, Need::kOptional);
  } else if (hidden_ok && heads_ok && t.attention() != model::MLA && t.hidden() % t.heads() != 0) {
    s.error("heads", fmt::format("heads ({}) must divide hidden ({}) unless head_dim is given", t.heads(), t.hidden()));
  }
  no_unspecified(s, "attention", "MHA, GQA or MLA");
  if (t.attention() == model::MLA) {
    if (s.require("mla")) {
      ConfigScope m = s.child("mla");
      m.in_range("q_lora_rank", 0, kMaxWidth, Need::kOptional);
      for (const char* f : {"kv_lora_rank", "qk_nope_head_dim", "v_head_dim"}) m.in_range(f, 1, kMaxWidth, Need::kRequired);
      m.in_range("qk_rope_head_dim", 0, kMaxWidth, Need::kRequired);
    }
  } else if (s.has("mla")) {
    s.error("mla", "mla ranks given but attention is not MLA");
  }
  if (t.attention() == model::GQA) s.require("kv_heads");
  no_unspecified(s, "norm", "LAYER_NORM or RMS_NORM");

  // Dense FFN: needed unless every layer is MoE with its own expert width and activation.
  const int total = t.encoder_layers() + t.layers();
  bool any_dense = !t.has_moe();
  for (int i = 0; layers_ok && i < total && !any_dense; ++i) any_dense = !is_moe_layer(t, i);
  const bool expert_ffn_own = t.has_moe() && t.moe().has_expert_ffn_hidden();
  const bool expert_act_own = t.has_moe() && t.moe().has_expert_activation();
  s.in_range("ffn_hidden", 1, kMaxWidth, any_dense || !expert_ffn_own ? Need::kRequired : Need::kOptional);
  if (!s.has("activation") && (any_dense || !expert_act_own)) s.require("activation");
  no_unspecified(s, "activation", "GELU, RELU, SWIGLU or GEGLU");

  const bool vision = t.has_vision();
  int patches = 0;
  if (vision) {
    ConfigScope v = s.child("vision");
    const model::VisionInput& vi = t.vision();
    const bool ps_ok = v.in_range("patch_size", 1, kMaxImage, Need::kRequired);
    v.in_range("channels", 1, 1024, Need::kOptional);
    v.in_range("classes", 0, kMaxVocab, Need::kOptional);
    if (v.has("image_size") && (v.has("image_height") || v.has("image_width")))
      v.error("image_size", "give image_size or image_height and image_width, not both");
    std::vector<const char*> sides = v.has("image_size") ? std::vector<const char*>{"image_size"}
                                                          : std::vector<const char*>{"image_height", "image_width"};
    patches = 1;
    for (const char* f : sides) {
      if (!v.in_range(f, 1, kMaxImage, Need::kRequired) || !ps_ok) {
        patches = 0;
        continue;
      }
      const int side = static_cast<int>(v.number(f));
      if (side % vi.patch_size() != 0) {
        v.error(f, fmt::format("{} is not a multiple of patch_size {}", side, vi.patch_size()));
        patches = 0;
      } else if (patches > 0) {
        patches *= side / vi.patch_size();
      }
    }
    if (sides.size() == 1 && patches > 0) patches *= patches;
    if (s.has("vocab") && t.vocab() != 0) s.error("vocab", "a vision transformer has no vocabulary; remove vocab");
    if (t.encoder_layers() > 0) s.error("encoder_layers", "a vision transformer is encoder-only: use layers");
  } else {
    s.in_range("vocab", 1, kMaxVocab, Need::kRequired);
  }
  s.in_range("max_sequence", 1, kMaxSequence, t.learned_positions() ? Need::kRequired : Need::kOptional);

  if (!t.has_moe()) return;
  ConfigScope m = s.child("moe");
  const model::Moe& moe = t.moe();
  const bool experts_ok = m.in_range("experts", 1, kMaxExperts, Need::kRequired);
  const bool patch = moe.has_patch_routing();
  if (patch) {
    if (m.has("top_k")) m.error("top_k", "patch routing (pMoE) picks patches per expert, not experts per token: remove top_k");
    ConfigScope pr = m.child("patch_routing");
    if (!vision) m.error("patch_routing", "patch routing needs a vision transformer (vision { ... })");
    if (pr.in_range("patches_per_expert", 1, kMaxSequence, Need::kRequired) && patches > 0 &&
        moe.patch_routing().patches_per_expert() > patches)
      pr.error("patches_per_expert",
               fmt::format("{} is more than the {} patches of an image", moe.patch_routing().patches_per_expert(), patches));
  } else if (m.in_range("top_k", 1, kMaxExperts, Need::kRequired) && experts_ok && moe.top_k() > moe.experts()) {
    m.error("top_k", fmt::format("top_k ({}) cannot exceed experts ({})", moe.top_k(), moe.experts()));
  }
  m.in_range("shared_experts", 0, kMaxExperts, Need::kOptional);
  m.in_range("expert_ffn_hidden", 1, kMaxWidth, Need::kOptional);
  no_unspecified(m, "expert_activation", "GELU, RELU, SWIGLU or GEGLU");
  const bool every_ok = m.in_range("every_n_layers", 1, kMaxLayers, Need::kOptional) || !m.has("every_n_layers");
  if (layers_ok) m.in_range("first_k_dense", 0, total - 1, Need::kOptional);
  if (every_ok && m.has("moe_layer_offset") && (moe.moe_layer_offset() < 0 || moe.moe_layer_offset() >= moe.every_n_layers()))
    m.error("moe_layer_offset", fmt::format("must be between 0 and every_n_layers - 1 ({}), got {}",
                                            moe.every_n_layers() - 1, moe.moe_layer_offset()));
}

void validate_reid(const ConfigScope& s) {
  if (s.require("backbone")) validate_resnet(s.child("backbone"));
  for (const char* f : {"virtual_images", "real_images"}) s.in_range(f, 1, kMaxBatch, Need::kRequired);
  for (const char* f : {"virtual_identities", "real_identities"}) s.in_range(f, 1, kMaxVocab, Need::kRequired);
  s.in_range("real_cameras", 1, 1 << 16, Need::kRequired);
  const auto& r = static_cast<const model::ReidRecipe&>(s.message());
  for (int i = 0; i < r.discriminator_hidden_size(); ++i)
    if (r.discriminator_hidden(i) < 1 || r.discriminator_hidden(i) > kMaxWidth)
      s.error("discriminator_hidden", fmt::format("widths must be between 1 and {}, got {}", kMaxWidth, r.discriminator_hidden(i)), i);
}

// ---------------------------------------------------------------------------------------------
// Workload and strategy on their own.

void check_precision(const ConfigScope& s, std::string_view field) {
  no_unspecified(s, field, "FP32, TF32, BF16, FP16 or FP8");
}

}  // namespace

void validate_model(const ConfigScope& s) {
  s.require("name");
  const auto& m = static_cast<const model::Model&>(s.message());
  switch (m.arch_case()) {
    case model::Model::kTransformer: validate_transformer(s.child("transformer")); break;
    case model::Model::kResnet: validate_resnet(s.child("resnet")); break;
    case model::Model::kReid: validate_reid(s.child("reid")); break;
    case model::Model::ARCH_NOT_SET: s.error("", "missing the architecture: one of transformer, resnet or reid"); break;
  }
}

void validate_workload(const ConfigScope& s) {
  s.require("name");
  const auto& w = static_cast<const workload::Workload&>(s.message());
  if (w.has_training()) {
    ConfigScope t = s.child("training");
    const bool gb = t.in_range("global_batch", 1, kMaxBatch, Need::kRequired);
    if (t.in_range("micro_batch", 1, kMaxBatch, Need::kOptional) && gb && w.training().micro_batch() > w.training().global_batch())
      t.error("micro_batch", fmt::format("micro_batch ({}) exceeds global_batch ({})", w.training().micro_batch(),
                                         w.training().global_batch()));
    t.in_range("sequence", 1, kMaxSequence, Need::kOptional);
    check_precision(t, "precision");
    no_unspecified(t, "optimizer", "ADAM, ADAMW or SGD");
    no_unspecified(t, "recompute", "NONE, SELECTIVE or FULL");
  } else if (w.has_inference()) {
    ConfigScope i = s.child("inference");
    i.in_range("batch", 1, kMaxBatch, Need::kRequired);
    i.in_range("prompt_tokens", 1, kMaxSequence, Need::kRequired);
    i.in_range("generated_tokens", 0, kMaxSequence, Need::kRequired);
    check_precision(i, "precision");
    check_precision(i, "kv_cache_precision");
  } else {
    s.error("", "missing the workload kind: training { ... } or inference { ... }");
  }
}

void validate_strategy(const ConfigScope& s) {
  s.require("name");
  const auto& st = static_cast<const strategy::Strategy&>(s.message());
  for (const char* f : {"dp", "tp", "pp", "ep", "virtual_stages", "overlap_chunks"}) s.in_range(f, 1, kMaxDegree, Need::kOptional);
  s.in_range("micro_batches", 1, kMaxBatch, Need::kOptional);
  s.in_range("zero_stage", 0, 3, Need::kOptional);
  if (s.has("capacity_factor") && !(st.capacity_factor() > 0 && st.capacity_factor() <= 1e6))
    s.error("capacity_factor", fmt::format("must be greater than zero, got {}", st.capacity_factor()));
  no_unspecified(s, "schedule", "GPIPE, ONE_F_ONE_B or INTERLEAVED_1F1B");
  no_unspecified(s, "drop_policy", "VANILLA, BATCH_PRIORITY or NO_DROP");
  no_unspecified(s, "all_to_all", "DIRECT or HIERARCHICAL");
  if (st.schedule() == strategy::INTERLEAVED_1F1B && st.virtual_stages() < 2)
    s.error("virtual_stages", "INTERLEAVED_1F1B needs virtual_stages of 2 or more");
  if (st.schedule() != strategy::INTERLEAVED_1F1B && st.virtual_stages() > 1)
    s.error("virtual_stages", "virtual stages need the INTERLEAVED_1F1B schedule");
  if (st.has_offload()) {
    ConfigScope o = s.child("offload");
    o.in_range("expert_fraction", 0, 1, Need::kOptional);
    o.in_range("prefetch_layers", 0, kMaxLayers, Need::kOptional);
  }
  if (st.has_placement()) s.child("placement").in_range("replicas", 0, kMaxExperts, Need::kOptional);
  s.positive("comm_buffer_bytes", Need::kOptional, /*allow_zero=*/true, 1e15);
}

model::Model load_model(const std::string& path) { return *load_model_config(path).msg; }

model::Model load_model_text(const std::string& text, const std::string& name) {
  return *parse<model::Model>(name, &text, validate_model).msg;
}

Loaded<model::Model> load_model_config(const std::string& path) { return parse<model::Model>(path, nullptr, validate_model); }
Loaded<workload::Workload> load_workload(const std::string& path) {
  return parse<workload::Workload>(path, nullptr, validate_workload);
}
Loaded<strategy::Strategy> load_strategy(const std::string& path) {
  return parse<strategy::Strategy>(path, nullptr, validate_strategy);
}
Loaded<workload::Workload> load_workload_text(const std::string& text, const std::string& name) {
  return parse<workload::Workload>(name, &text, validate_workload);
}
Loaded<strategy::Strategy> load_strategy_text(const std::string& text, const std::string& name) {
  return parse<strategy::Strategy>(name, &text, validate_strategy);
}

// ---------------------------------------------------------------------------------------------
// Together.

Layout check_layout(int devices, const model::Model& m, const ModelCost& cost, const Loaded<workload::Workload>& wl,
                    const Loaded<strategy::Strategy>& sl, Diagnostics* diags) {
  const ConfigScope s = sl.doc->root(diags);
  const ConfigScope w = wl.doc->root(diags);
  const strategy::Strategy& st = *sl;
  const workload::Workload& wk = *wl;
  Layout l;
  l.devices = devices;
  l.dp = st.dp();
  l.tp = st.tp();
  l.pp = st.pp();
  l.ep = st.ep();
  l.virtual_stages = st.virtual_stages();
  l.training = wk.has_training();
  l.sequence = cost.sequence;

  const int64_t ranks = int64_t{l.dp} * l.tp * l.pp;
  if (ranks != devices)
    s.error("dp", fmt::format("dp x tp x pp = {} x {} x {} = {} ranks, but the cluster has {} devices", l.dp, l.tp, l.pp,
                              ranks, devices));

  // Tensor parallelism splits heads (and FFN widths).
  if (m.has_transformer()) {
    const model::Transformer& t = m.transformer();
    const int kv = t.has_kv_heads() ? t.kv_heads() : t.heads();
    if (t.heads() % l.tp != 0)
      s.error("tp", fmt::format("tp ({}) must divide the model's {} attention heads", l.tp, t.heads()));
    else if (t.attention() != model::MLA && kv % l.tp != 0 && l.tp % kv != 0)
      s.error("tp", fmt::format("tp ({}) and the model's {} kv heads must divide one another", l.tp, kv));
  } else if (l.tp > 1) {
    s.error("tp", "tensor parallelism of convolutional networks is not modelled: use tp 1");
  }

  // Expert parallelism.
  int experts = 0;
  for (const Layer& layer : cost.layers) experts = std::max(experts, layer.experts);
  if (l.ep > 1 && experts == 0) s.error("ep", fmt::format("ep is {} but the model has no MoE layers", l.ep));
  if (experts > 0 && experts % l.ep != 0)
    s.error("ep", fmt::format("ep ({}) must divide the model's {} experts", l.ep, experts));
  if (l.dp % l.ep != 0)
    s.error("ep", fmt::format("ep ({}) must divide dp ({}): expert-parallel groups are drawn from the data-parallel ranks",
                              l.ep, l.dp));
  l.expert_dp = std::max(1, l.dp / l.ep);
  if (st.has_placement()) {
    const ConfigScope p = s.child("placement");
    const strategy::ExpertPlacement& pl = st.placement();
    if (pl.expert_rank_size() > 0 && pl.expert_rank_size() != experts)
      p.error("expert_rank", fmt::format("gives {} experts a rank, the model has {}", pl.expert_rank_size(), experts));
    for (int i = 0; i < pl.expert_rank_size(); ++i)
      if (pl.expert_rank(i) < 0 || pl.expert_rank(i) >= l.ep)
        p.error("expert_rank", fmt::format("EP rank {} is outside 0..{}", pl.expert_rank(i), l.ep - 1), i);
  }

  // Pipeline stages.
  int blocks = 0;  // layers that stages split: transformer layers or residual blocks
  for (const Layer& layer : cost.layers)
    blocks += layer.kind == LayerKind::kTransformer || layer.kind == LayerKind::kResBlock;
  if (int64_t{l.pp} * l.virtual_stages > blocks)
    s.error("pp", fmt::format("pp x virtual_stages = {} x {} exceeds the model's {} layers", l.pp, l.virtual_stages, blocks));
  if (m.has_reid() && l.pp > 1) s.error("pp", "pipelining the ReID recipe's several networks is not modelled: use pp 1");

  // Batch.
  if (wk.has_training()) {
    const workload::Training& tr = wk.training();
    l.global_batch = tr.global_batch();
    l.micro_batch = tr.micro_batch() > 0 ? tr.micro_batch() : 1;
    const int64_t per_step = int64_t{l.dp} * l.micro_batch;
    if (st.has_micro_batches()) {
      l.micro_batches = st.micro_batches();
      if (per_step * l.micro_batches != l.global_batch)
        s.error("micro_batches", fmt::format("dp x micro_batch x micro_batches = {} x {} x {} = {}, but global_batch is {}",
                                             l.dp, l.micro_batch, l.micro_batches, per_step * l.micro_batches, l.global_batch));
    } else if (l.global_batch % per_step != 0) {
      w.child("training").error("global_batch", fmt::format("global_batch ({}) is not a multiple of dp x micro_batch = {} x {}",
                                                            l.global_batch, l.dp, l.micro_batch));
    } else {
      l.micro_batches = l.global_batch / per_step;
    }
    if (st.schedule() == strategy::INTERLEAVED_1F1B && l.micro_batches % l.pp != 0)
      s.error("schedule", fmt::format("interleaved 1F1B needs micro_batches ({}) to be a multiple of pp ({})",
                                      l.micro_batches, l.pp));
    if (m.has_reid() && l.global_batch != m.reid().virtual_images() + m.reid().real_images())
      w.child("training").error("global_batch", fmt::format("the ReID recipe's batch is {} virtual + {} real images",
                                                            m.reid().virtual_images(), m.reid().real_images()));
  } else if (wk.has_inference()) {
    l.global_batch = wk.inference().batch();
    if (l.global_batch % l.dp != 0)
      w.child("inference").error("batch", fmt::format("batch ({}) is not a multiple of dp ({})", l.global_batch, l.dp));
    l.micro_batch = std::max<int64_t>(1, l.global_batch / l.dp);
    if (st.has_micro_batches()) {
      l.micro_batches = st.micro_batches();
      if (l.micro_batch % l.micro_batches != 0)
        s.error("micro_batches", fmt::format("must divide the per-replica batch ({})", l.micro_batch));
      else
        l.micro_batch /= l.micro_batches;
    }
  }
  if (wk.has_routing()) validate_routing(w.child("routing"), experts);

  // Stage assignment: stage p holds blocks [start(p), start(p+1)) with
  // start(p) = p * (blocks / pp) + min(p, blocks % pp); layers before the first block join the
  // first stage, layers after the last block the last stage.
  const int stages = std::max(1, l.pp);
  l.stage_layers.assign(stages, {});
  auto start = [&](int p) { return p * (blocks / stages) + std::min(p, blocks % stages); };
  int seen = 0, stage = 0;
  for (int i = 0; i < static_cast<int>(cost.layers.size()); ++i) {
    const bool block = cost.layers[i].kind == LayerKind::kTransformer || cost.layers[i].kind == LayerKind::kResBlock;
    if (block) {
      while (stage + 1 < stages && seen >= start(stage + 1)) ++stage;
      ++seen;
    }
    l.stage_layers[stage].push_back(i);
  }
  return l;
}

double activation_bytes(const workload::Workload& workload) {
  const workload::Precision p = workload.has_training() ? workload.training().precision() : workload.inference().precision();
  return p == workload::FP32 || p == workload::TF32 ? 4 : 2;
}

// The model analysed at the workload's sequence length.
static ModelCost analyze_for(const model::Model& model, const workload::Workload& workload) {
  ModelOptions o;
  o.act_elem_bytes = activation_bytes(workload);
  if (workload.has_training() && workload.training().has_sequence()) o.sequence = workload.training().sequence();
  if (workload.has_inference()) o.sequence = workload.inference().prompt_tokens() + workload.inference().generated_tokens();
  return analyze(model, o);
}

Setup load_setup_without_strategy(const ConfigSource& cluster, const ConfigSource& model, const ConfigSource& workload) {
  std::vector<Diagnostic> problems;
  Setup s;
  auto attempt = [&](auto&& load) {
    try {
      load();
    } catch (const ConfigError& e) {
      problems.insert(problems.end(), e.diagnostics().begin(), e.diagnostics().end());
    }
  };
  attempt([&] {
    s.cluster = std::make_shared<topo::Cluster>(cluster.text ? topo::load_cluster_text(*cluster.text, cluster.path)
                                                             : topo::load_cluster(cluster.path));
  });
  attempt([&] { s.model = parse<model::Model>(model.path, model.text ? &*model.text : nullptr, validate_model); });
  attempt([&] { s.workload = parse<workload::Workload>(workload.path, workload.text ? &*workload.text : nullptr, validate_workload); });
  if (!problems.empty()) throw ConfigError(std::move(problems));
  s.cost = analyze_for(*s.model, *s.workload);
  return s;
}

Setup with_strategy(const Setup& base, Loaded<strategy::Strategy> strategy) {
  Setup s = base;
  s.strategy = std::move(strategy);
  Diagnostics diags;
  s.layout = check_layout(s.cluster->device_count(), *s.model, s.cost, s.workload, s.strategy, &diags);
  diags.throw_if_any();
  return s;
}

Setup load_setup(const std::string& cluster_path, const std::string& model_path, const std::string& workload_path,
                 const std::string& strategy_path) {
  return load_setup(ConfigSource{cluster_path, std::nullopt}, ConfigSource{model_path, std::nullopt},
                    ConfigSource{workload_path, std::nullopt}, ConfigSource{strategy_path, std::nullopt});
}

Setup load_setup(const ConfigSource& cluster, const ConfigSource& model, const ConfigSource& workload,
                 const ConfigSource& strategy) {
  // Each file on its own first, collecting every file's problems before giving up.
  std::vector<Diagnostic> problems;
  std::optional<Setup> s;
  Loaded<strategy::Strategy> st;
  try {
    s.emplace(load_setup_without_strategy(cluster, model, workload));
  } catch (const ConfigError& e) {
    problems.insert(problems.end(), e.diagnostics().begin(), e.diagnostics().end());
  }
  try {
    st = parse<strategy::Strategy>(strategy.path, strategy.text ? &*strategy.text : nullptr, validate_strategy);
  } catch (const ConfigError& e) {
    problems.insert(problems.end(), e.diagnostics().begin(), e.diagnostics().end());
  }
  if (!problems.empty()) throw ConfigError(std::move(problems));
  return with_strategy(*s, std::move(st));
}

}  // namespace moesim::cost
