#include "planner/sweep.h"

#include "planner/planner.h"

#include "common/config.h"
#include "sim/scenario.pb.h"

#include <fmt/format.h>
#include <google/protobuf/text_format.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <exception>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>

namespace moesim::planner {
namespace {

namespace fs = std::filesystem;
namespace pb = google::protobuf;

struct TargetName {
  const char* name;
  SweepTarget target;
};
constexpr TargetName kTargets[] = {{"cluster", SweepTarget::kCluster},
                                   {"model", SweepTarget::kModel},
                                   {"workload", SweepTarget::kWorkload},
                                   {"strategy", SweepTarget::kStrategy},
                                   {"seed", SweepTarget::kSeed}};

const char* target_name(SweepTarget t) {
  for (const TargetName& n : kTargets)
    if (n.target == t) return n.name;
  return "?";
}

// The four configs and the scenario's seed, as messages the axes can be applied to.
struct Messages {
  hw::Cluster cluster;
  model::Model model;
  workload::Workload workload;
  strategy::Strategy strategy;
  scenario::Scenario seed;  // only its `seed` field

  pb::Message* of(SweepTarget t) {
    switch (t) {
      case SweepTarget::kCluster: return &cluster;
      case SweepTarget::kModel: return &model;
      case SweepTarget::kWorkload: return &workload;
      case SweepTarget::kStrategy: return &strategy;
      case SweepTarget::kSeed: return &seed;
    }
    return nullptr;
  }
};

// Sets an axis's value on the message of its target; returns the field set.
const pb::FieldDescriptor* apply(const SweepAxis& axis, const FieldValue& value, Messages* m) {
  if (axis.target == SweepTarget::kSeed) return set_field(m->of(axis.target), "seed", value);
  return set_field(m->of(axis.target), axis.subpath, value, target_name(axis.target));
}

bool valid_name(const std::string& name) {
  if (name.empty()) return false;
  for (char c : name)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') return false;
  return true;
}

void load_message(const std::string& path, pb::Message* msg) { ConfigDocument::parse_file(path, msg); }

bool starts_with(const std::string& s, const std::string& prefix) { return s.compare(0, prefix.size(), prefix) == 0; }

}  // namespace

size_t Sweep::point_count() const {
  size_t n = 1;
  for (const SweepAxis& a : axes)
    if (a.follows < 0) n *= a.values.size();
  return n;
}

std::vector<size_t> Sweep::point_values(size_t index) const {
  std::vector<size_t> v(axes.size());
  for (size_t a = axes.size(); a-- > 0;) {
    if (axes[a].follows >= 0) continue;
    v[a] = index % axes[a].values.size();
    index /= axes[a].values.size();
  }
  for (size_t a = 0; a < axes.size(); ++a)
    if (axes[a].follows >= 0) v[a] = v[static_cast<size_t>(axes[a].follows)];
  return v;
}

std::string Sweep::point_id(size_t index) const { return fmt::format("sweep:{}:{}", name, index); }

std::string Sweep::point_label(size_t index) const {
  const std::vector<size_t> v = point_values(index);
  std::string out;
  for (size_t a = 0; a < axes.size(); ++a)
    out += fmt::format("{}{}={}", a ? " " : "", axes[a].field, axes[a].values[v[a]].to_string());
  return out;
}

Sweep load_sweep(const std::string& path) {
  sweep::Sweep spec;
  ConfigDocument doc = ConfigDocument::parse_file(path, &spec);
  Diagnostics diags;
  ConfigScope root = doc.root(&diags);
  Sweep s;
  s.path = path;
  s.name = spec.name();
  s.name_line = root.line_of("name");
  s.description = spec.description();
  s.replan = spec.replan();
  if (root.require("name") && !valid_name(spec.name()))
    root.error("name", fmt::format("'{}': use letters, digits, '.', '_' and '-' (it is part of every point's id in the results store)",
                                   spec.name()));
  s.replan_line = root.line_of("replan");

  // The base scenario, validated as `moesim simulate` would; its configs as written, for the axes.
  std::vector<Diagnostic> scenario_problems;
  std::optional<Messages> base;
  if (root.require("scenario")) {
    const fs::path rel(spec.scenario());
    const fs::path p = (rel.is_absolute() ? rel : fs::path(path).parent_path() / rel).lexically_normal();
    if (spec.scenario().empty()) root.error("scenario", "empty path");
    else if (!fs::is_regular_file(p)) root.error("scenario", fmt::format("no such file: {}", p.string()));
    else {
      try {
        s.base = sim::load_scenario(p.string());
        scenario::Scenario sc;
        load_message(p.string(), &sc);
        Messages m;
        s.from_file[0] = sc.has_cluster();
        s.from_file[1] = sc.has_model();
        s.from_file[2] = sc.has_workload();
        s.from_file[3] = sc.has_strategy();
        // load_scenario labels a config given by path with its resolved path.
        if (sc.has_cluster()) load_message(s.base.cluster, &m.cluster);
        else m.cluster = sc.cluster_inline();
        if (sc.has_model()) load_message(s.base.model, &m.model);
        else m.model = sc.model_inline();
        if (sc.has_workload()) load_message(s.base.workload, &m.workload);
        else m.workload = sc.workload_inline();
        if (sc.has_strategy()) load_message(s.base.strategy, &m.strategy);
        else m.strategy = sc.strategy_inline();
        m.seed.set_seed(s.base.seed);
        s.cluster = m.cluster;
        s.model = m.model;
        s.workload = m.workload;
        s.strategy = m.strategy;
        base = std::move(m);
      } catch (const ConfigError& e) {
        scenario_problems = e.diagnostics();
      }
    }
  }

  if (spec.axis_size() == 0) root.error("axis", "no axes: give at least one `axis { field: \"...\" values: [...] }`");
  std::map<std::string, int> seen;  // field -> its axis's line
  bool all_valid = true;
  // One field with its values, tried on (a copy of) the base configs: a bad path once, each bad
  // value at its place. Returns false when it has problems.
  auto parse_field = [&](const sweep::Axis& a, const ConfigScope& scope, SweepAxis* axis) {
    axis->line = scope.line_of("field");
    if (!scope.require("field")) return false;
    axis->field = a.field();
    bool ok = true;
    if (auto [it, fresh] = seen.emplace(axis->field, axis->line); !fresh) {
      scope.error("field", fmt::format("'{}' is swept by another axis already (line {})", axis->field, it->second));
      ok = false;
    }
    const size_t dot = axis->field.find('.');
    const std::string head = axis->field.substr(0, dot);
    bool known = false;
    for (const TargetName& t : kTargets)
      if (head == t.name) axis->target = t.target, known = true;
    axis->subpath = dot == std::string::npos ? "" : axis->field.substr(dot + 1);
    const bool bad_shape =
        (axis->target == SweepTarget::kSeed) != axis->subpath.empty() || (dot != std::string::npos && axis->subpath.empty());
    if (!known || bad_shape) {
      scope.error("field", fmt::format("'{}': no field '{}' at the top; a path starts with one of: cluster, model, workload, "
                                       "strategy (then a '.' and the field in that config), or is `seed`",
                                       axis->field, head));
      return false;
    }
    if (a.values_size() > 0 && a.strings_size() > 0) {
      scope.error("strings", "give `values` (numbers) or `strings`, not both");
      return false;
    }
    if (a.values_size() == 0 && a.strings_size() == 0) {
      scope.error("values", "no values: give `values: [...]` (numbers) or `strings: [...]` (enum names, texts)");
      return false;
    }
    axis->is_text = a.strings_size() > 0;
    for (double v : a.values()) axis->values.push_back(FieldValue::of(v));
    for (const std::string& v : a.strings()) axis->values.push_back(FieldValue::of(v));
    for (size_t j = 0; j < axis->values.size(); ++j) {
      Messages m = base ? *base : Messages{};
      try {
        const pb::FieldDescriptor* f = apply(*axis, axis->values[j], &m);
        const FieldValue& v = axis->values[j];
        double metric = static_cast<double>(j);
        if (v.number) metric = *v.number;
        else if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_ENUM) metric = f->enum_type()->FindValueByName(v.text)->number();
        else if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_BOOL) metric = v.text == "true" ? 1 : 0;
        axis->metric_values.push_back(metric);
      } catch (const FieldPathError& e) {
        ok = false;
        if (e.kind() == FieldPathError::Kind::kPath) {
          scope.error("field", fmt::format("'{}': {}", axis->field, e.what()));
          break;
        }
        scope.error(axis->is_text ? "strings" : "values", e.what(), static_cast<int>(j));
      }
    }
    return ok;
  };
  for (int i = 0; i < spec.axis_size(); ++i) {
    const sweep::Axis& a = spec.axis(i);
    const ConfigScope scope = root.child("axis", i);
    SweepAxis axis;
    all_valid &= parse_field(a, scope, &axis);
    const int primary = static_cast<int>(s.axes.size());
    const size_t length = axis.values.size();
    s.axes.push_back(std::move(axis));
    for (int k = 0; k < a.together_size(); ++k) {
      const ConfigScope linked_scope = scope.child("together", k);
      SweepAxis linked;
      linked.follows = primary;
      all_valid &= parse_field(a.together(k), linked_scope, &linked);
      if (a.together(k).together_size() > 0) {
        linked_scope.error("together", "a `together` field moves with its axis: it has no `together` of its own");
        all_valid = false;
      }
      if (length > 0 && linked.values.size() > 0 && linked.values.size() != length) {
        linked_scope.error(linked.is_text ? "strings" : "values",
                           fmt::format("{} values, but its axis '{}' has {}: fields that move together list as many",
                                       linked.values.size(), a.field(), length));
        all_valid = false;
      }
      s.axes.push_back(std::move(linked));
    }
  }
  if (all_valid) {
    size_t n = 1;
    for (const SweepAxis& a : s.axes) {
      if (a.follows >= 0) continue;
      if (n > kMaxSweepPoints / a.values.size()) {
        root.error("axis", fmt::format("the grid has more than {} points", kMaxSweepPoints));
        break;
      }
      n *= a.values.size();
    }
  }
  for (Diagnostic& d : scenario_problems) diags.add(std::move(d));
  diags.throw_if_any();
  return s;
}

sim::Scenario build_point(const Sweep& s, size_t index) {
  MOESIM_ASSERT(index < s.point_count(), "point {} of a sweep of {} points", index, s.point_count());
  Messages m{s.cluster, s.model, s.workload, s.strategy, {}};
  m.seed.set_seed(s.base.seed);
  const std::vector<size_t> at = s.point_values(index);
  bool touched[4] = {false, false, false, false};
  for (size_t a = 0; a < s.axes.size(); ++a) {
    const SweepAxis& axis = s.axes[a];
    try {
      apply(axis, axis.values[at[a]], &m);
    } catch (const FieldPathError& e) {  // load_sweep tried every value: only a bug gets here
      throw ConfigError({Diagnostic{s.path, axis.line, 0, axis.field, fmt::format("{} (point {})", e.what(), index)}});
    }
    if (axis.target != SweepTarget::kSeed) touched[static_cast<int>(axis.target)] = true;
  }

  // Changed (or inline) configs go in as text, under a label naming the point.
  const std::string* labels[4] = {&s.base.cluster, &s.base.model, &s.base.workload, &s.base.strategy};
  std::string point_labels[4];
  auto source = [&](int t, const pb::Message& msg) -> cost::ConfigSource {
    if (!touched[t] && s.from_file[t]) return {*labels[t], std::nullopt};
    point_labels[t] = fmt::format("{} [point {}]", *labels[t], index);
    std::string text;
    pb::TextFormat::PrintToString(msg, &text);
    return {point_labels[t], std::move(text)};
  };
  // Problems of a printed config: at the axis that set the field when there is one, else at the
  // base config (the printed text's lines are nobody's).
  auto repoint = [&](const ConfigError& e) {
    std::vector<Diagnostic> out;
    for (Diagnostic d : e.diagnostics()) {
      int t = -1;
      for (int k = 0; k < 4; ++k)
        if (!point_labels[k].empty() && d.file == point_labels[k]) t = k;
      const SweepAxis* hit = nullptr;
      size_t hit_a = 0;
      for (size_t a = 0; t >= 0 && a < s.axes.size(); ++a) {
        const SweepAxis& axis = s.axes[a];
        const bool about_it = d.field_path == axis.subpath || starts_with(d.field_path, axis.subpath + ".") ||
                              starts_with(d.field_path, axis.subpath + "[");
        if (static_cast<int>(axis.target) == t && about_it) hit = &axis, hit_a = a;
      }
      if (hit) {
        d.message += fmt::format(" (point {}: {} = {})", index, hit->field, hit->values[at[hit_a]].to_string());
        d.file = s.path;
        d.line = hit->line;
        d.column = 0;
        d.field_path = hit->field;
      } else {
        if (t >= 0) d.file = *labels[t], d.line = 0, d.column = 0;
        d.message += fmt::format(" (point {})", index);
      }
      out.push_back(std::move(d));
    }
    return ConfigError(std::move(out));
  };

  std::string planned;  // the re-planned strategy's name
  if (s.replan) {
    SearchOptions o;
    o.pinned = m.strategy;
    // What the planner searches is left free unless an axis sets it; the rest stays pinned.
    const pb::Descriptor& type = *o.pinned.GetDescriptor();
    for (const char* knob : {"name", "description", "dp", "tp", "pp", "ep", "virtual_stages", "zero_stage", "micro_batches",
                             "schedule", "all_to_all", "overlap_chunks"}) {
      const bool swept = std::any_of(s.axes.begin(), s.axes.end(), [&](const SweepAxis& a) {
        return a.target == SweepTarget::kStrategy && (a.subpath == knob || starts_with(a.subpath, std::string(knob) + "."));
      });
      if (!swept) o.pinned.GetReflection()->ClearField(&o.pinned, type.FindFieldByName(knob));
    }
    o.seed = m.seed.seed();
    o.routing_samples = s.base.routing_samples;
    o.top = 1;
    SearchResult r;
    try {
      r = search(source(0, m.cluster), source(1, m.model), source(2, m.workload), o);
    } catch (const ConfigError& e) {
      throw repoint(e);
    }
    if (r.plans.empty())
      throw ConfigError({Diagnostic{s.path, s.replan_line, 0, "replan",
                                    fmt::format("no plan: {} (point {})",
                                                r.no_plan_reason.empty() ? "the planner found none" : r.no_plan_reason, index)}});
    const plan::Plan& best = r.plans[0].plan;
    m.strategy = best.strategy();
    planned = best.strategy().name();
    if (m.workload.has_training()) {
      if (best.has_micro_batch()) m.workload.mutable_training()->set_micro_batch(best.micro_batch());
      if (best.has_recompute()) m.workload.mutable_training()->set_recompute(best.recompute());
    }
    touched[2] = touched[3] = true;
  }

  const cost::ConfigSource cluster = source(0, m.cluster), model = source(1, m.model), workload = source(2, m.workload),
                           strategy = source(3, m.strategy);
  sim::Scenario p;
  try {
    p.setup = cost::load_setup(cluster, model, workload, strategy);
  } catch (const ConfigError& e) {
    throw repoint(e);
  }
  p.path = s.base.path;
  p.name = fmt::format("{} [{}]", s.base.name, s.point_label(index));
  p.seed = m.seed.seed();
  p.routing_samples = s.base.routing_samples;
  p.profile = s.base.profile;
  p.cluster = s.base.cluster;
  p.model = s.base.model;
  p.workload = s.base.workload;
  p.strategy = planned.empty() ? s.base.strategy : fmt::format("planned: {}", planned);
  return p;
}

SweepRun run_sweep(const Sweep& s, Store& store, const SweepOptions& options) {
  MOESIM_ASSERT(options.evaluate != nullptr, "run_sweep without an evaluator");
  const auto t0 = std::chrono::steady_clock::now();
  const size_t n = s.point_count();
  SweepRun out;
  out.points.resize(n);
  for (size_t i = 0; i < n; ++i) out.points[i].index = i;

  // What a previous run stored: skipped, once checked to be points of this very grid.
  const std::string prefix = fmt::format("sweep:{}:", s.name);
  Diagnostics mismatch;
  for (RunRecord& r : store.list_runs(RunKind::kSweep)) {
    if (!starts_with(r.id, prefix)) continue;
    const std::string tail = r.id.substr(prefix.size());
    if (tail.empty() || tail.size() > 18 || tail.find_first_not_of("0123456789") != std::string::npos) continue;
    const size_t i = std::stoull(tail);
    const std::map<std::string, double> metrics = store.metrics(r.id);
    std::string differs;
    if (i >= n) {
      differs = fmt::format("point {} is beyond this sweep's {} points", i, n);
    } else {
      const std::vector<size_t> at = s.point_values(i);
      for (size_t a = 0; a < s.axes.size() && differs.empty(); ++a) {
        const std::string key = "axis." + s.axes[a].field;
        const auto it = metrics.find(key);
        const double want = s.axes[a].metric_values[at[a]];
        if (it == metrics.end()) differs = fmt::format("point {} has no {}", i, s.axes[a].field);
        else if (it->second != want)
          differs = fmt::format("point {} has {} = {}, this file gives {}", i, s.axes[a].field, it->second, want);
      }
      if (differs.empty()) {
        size_t axes_stored = 0;
        for (const auto& [k, v] : metrics) axes_stored += starts_with(k, "axis.");
        if (axes_stored != s.axes.size())
          differs = fmt::format("point {} was swept over {} axes, this file has {}", i, axes_stored, s.axes.size());
      }
    }
    if (!differs.empty()) {
      mismatch.add(Diagnostic{s.path, s.name_line, 0, "name",
                              fmt::format("the results store {} holds another sweep named '{}' ({}): give this one another name "
                                          "or use another --db",
                                          store.path(), s.name, differs)});
      break;
    }
    PointRun& p = out.points[i];
    p.skipped = true;
    p.status = r.status;
    p.record = std::move(r);
  }
  mismatch.throw_if_any();

  std::vector<size_t> pending;
  for (const PointRun& p : out.points)
    if (!p.skipped) pending.push_back(p.index);
  if (options.on_start) options.on_start(pending.size());

  std::atomic<size_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex mu;
  std::exception_ptr store_failure;
  auto work = [&] {
    for (size_t k; !stop && (k = next++) < pending.size();) {
      const size_t i = pending[k];
      PointRun p;
      p.index = i;
      std::optional<PointOutcome> outcome;
      try {
        outcome = options.evaluate(s, i);
      } catch (const std::exception& e) {
        p.status = "error";
        p.error = e.what();
      }
      if (outcome) {
        RunRecord& rec = outcome->record;
        rec.id = s.point_id(i);
        rec.kind = RunKind::kSweep;
        if (rec.status != "ok") rec.step_time_s.reset(), rec.tokens_per_s.reset(), rec.mfu.reset();
        const std::vector<size_t> at = s.point_values(i);
        for (size_t a = 0; a < s.axes.size(); ++a)
          outcome->metrics.push_back({"axis." + s.axes[a].field, s.axes[a].metric_values[at[a]]});
        outcome->metrics.push_back({"point", static_cast<double>(i)});
        try {
          store.insert_run(rec, outcome->metrics);
          p.status = rec.status;
          p.record = std::move(rec);
        } catch (const StoreError&) {
          // Another process running the same sweep on the same file may have stored it first.
          if (std::optional<RunRecord> there = store.find_run(rec.id)) {
            p.skipped = true;
            p.status = there->status;
            p.record = std::move(there);
          } else {
            std::lock_guard lock(mu);
            if (!store_failure) store_failure = std::current_exception();
            stop = true;
            continue;
          }
        }
      }
      {
        std::lock_guard lock(mu);
        out.points[i] = std::move(p);
      }
      if (options.on_done) options.on_done(i);
    }
  };
  const size_t jobs = std::min<size_t>(static_cast<size_t>(std::max(1, options.jobs)), pending.size());
  if (jobs <= 1) {
    work();
  } else {
    std::vector<std::thread> threads;
    for (size_t j = 0; j < jobs; ++j) threads.emplace_back(work);
    for (std::thread& t : threads) t.join();
  }
  if (store_failure) std::rethrow_exception(store_failure);

  for (const PointRun& p : out.points) {
    out.skipped += p.skipped;
    out.ok += p.status == "ok";
    out.invalid += p.status == "invalid";
    out.errors += p.status == "error";
  }
  out.wall_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return out;
}

}  // namespace moesim::planner
