#include "traces/chrome_trace.h"

#include "common/config.h"
#include "common/error.h"
#include "common/files.h"
#include "traces/recorder.h"

#include <fmt/format.h>
#include <google/protobuf/text_format.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

namespace moesim::trace {
namespace {

// Integer nanoseconds as exact decimal microseconds: 1500000 -> "1500", 1234 -> "1.234".
std::string micros(int64_t ns) {
  const bool negative = ns < 0;
  const uint64_t abs_ns = negative ? 0 - static_cast<uint64_t>(ns) : static_cast<uint64_t>(ns);
  std::string out = fmt::format("{}{}", negative ? "-" : "", abs_ns / 1000);
  if (uint64_t frac = abs_ns % 1000; frac != 0) {
    std::string digits = fmt::format("{:03}", frac);
    while (digits.back() == '0') digits.pop_back();
    out += '.';
    out += digits;
  }
  return out;
}

// A double as a JSON number (shortest form that reads back the same); null when not finite,
// which JSON cannot write.
std::string json_number(double v) { return std::isfinite(v) ? fmt::format("{}", v) : "null"; }

std::string stream_label(const Stream& s) {
  std::string_view kind = stream_kind_name(s.kind());
  return fmt::format("{} {}", kind.empty() ? "stream" : kind, s.index());
}

struct ProcessInfo {
  std::string device;
  const RankMemory* memory = nullptr;
};

std::string read_bytes(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw ConfigError({Diagnostic{path, 0, 0, "", "is a directory, not a trace file"}});
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError({Diagnostic{path, 0, 0, "", fmt::format("cannot read: {}", std::strerror(errno))}});
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw ConfigError({Diagnostic{path, 0, 0, "", "read error"}});
  return std::move(ss).str();
}

// Writes `bytes` to `path` whole (common/files.h), or throws TraceError naming the file.
void write_trace_file(const std::string& path, const std::string& bytes) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    throw TraceError(fmt::format("{}: is a directory, cannot write a trace file there", path));
  if (const std::string why = write_file_atomically(path, bytes); !why.empty())
    throw TraceError(fmt::format("{}: cannot write: {}", path, why));
}

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

bool looks_textual(const std::string& bytes) {
  for (unsigned char c : bytes) {
    if (c >= 0x20 && c != 0x7f) continue;  // printable ASCII and UTF-8 bytes
    if (c == '\n' || c == '\r' || c == '\t' || c == '\f' || c == '\v') continue;
    return false;
  }
  return true;
}

void check_amount(const ConfigScope& scope, std::string_view field, double v) {
  if (!std::isfinite(v) || v < 0) scope.error(field, fmt::format("must be a finite number >= 0, got {}", v));
}

void validate(const Trace& t, const ConfigScope& root) {
  for (int i = 0; i < t.spans_size(); ++i) {
    const Span& s = t.spans(i);
    bool bad_amounts = false;
    for (double v : {s.bytes(), s.flops(), s.routing_host_s(), s.dispatch_host_s()}) bad_amounts |= !std::isfinite(v) || v < 0;
    const bool bad = s.op_id().empty() || op_kind_name(s.kind()).empty() || s.start_ns() < 0 ||
                     s.end_ns() < s.start_ns() || bad_amounts;
    if (!bad) continue;  // scopes only for the spans with problems: traces have millions of spans
    ConfigScope scope = root.child("spans", i);
    if (s.op_id().empty()) scope.error("op_id", "missing op id");
    if (op_kind_name(s.kind()).empty())
      scope.error("kind", s.kind() == OP_KIND_UNSPECIFIED ? std::string("missing op kind")
                                                          : fmt::format("unknown op kind {}", static_cast<int>(s.kind())));
    if (s.start_ns() < 0) scope.error("start_ns", fmt::format("must be >= 0, got {}", s.start_ns()));
    if (s.end_ns() < s.start_ns())
      scope.error("end_ns", fmt::format("ends at {} ns, before its start at {} ns", s.end_ns(), s.start_ns()));
    check_amount(scope, "bytes", s.bytes());
    check_amount(scope, "flops", s.flops());
    check_amount(scope, "routing_host_s", s.routing_host_s());
    check_amount(scope, "dispatch_host_s", s.dispatch_host_s());
  }
  for (int i = 0; i < t.peak_memory_size(); ++i) {
    const double v = t.peak_memory(i).peak_bytes();
    if (!std::isfinite(v) || v < 0) check_amount(root.child("peak_memory", i), "peak_bytes", v);
  }
  for (int i = 0; i < t.expert_load_size(); ++i) {
    const ExpertLoad& l = t.expert_load(i);
    for (int64_t count : l.tokens_per_expert()) {
      if (count >= 0) continue;
      root.child("expert_load", i).error("tokens_per_expert", fmt::format("negative token count {}", count));
      break;
    }
  }
}

}  // namespace

int chrome_tid(const Stream& stream) { return 1000 * static_cast<int>(stream.kind()) + stream.index(); }

std::string json_quote(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 2);
  out += '"';
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        default:
          if (c < 0x20) {
            out += fmt::format("\\u{:04x}", c);
          } else {
            out += static_cast<char>(c);
          }
      }
      ++i;
      continue;
    }
    // A UTF-8 sequence: copied when well formed (no overlong forms, no surrogates, <= U+10FFFF),
    // else one U+FFFD for the offending byte.
    size_t len = 0;
    uint32_t cp = 0;
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
      cp = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      cp = c & 0x0f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      cp = c & 0x07;
    }
    bool ok = len > 0 && i + len <= s.size();
    for (size_t k = 1; ok && k < len; ++k) {
      const unsigned char cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xc0) != 0x80) ok = false;
      cp = (cp << 6) | (cc & 0x3f);
    }
    if (ok) {
      const uint32_t min_cp = len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000;
      ok = cp >= min_cp && cp <= 0x10ffff && !(cp >= 0xd800 && cp <= 0xdfff);
    }
    if (ok) {
      out.append(s.substr(i, len));
      i += len;
    } else {
      out += "\xef\xbf\xbd";
      ++i;
    }
  }
  out += '"';
  return out;
}

std::string chrome_trace_json(const Trace& trace) {
  // Processes (ranks) and threads (streams) that appear, in order, with what names them.
  std::map<int, ProcessInfo> processes;
  std::map<std::pair<int, int>, const Stream*> threads;
  for (const Span& s : trace.spans()) {
    ProcessInfo& p = processes[s.rank()];
    if (p.device.empty()) p.device = s.device();
    threads.emplace(std::pair(s.rank(), chrome_tid(s.stream())), &s.stream());
  }
  for (const RankMemory& m : trace.peak_memory()) {
    ProcessInfo& p = processes[m.rank()];
    if (p.device.empty()) p.device = m.device();
    p.memory = &m;
  }

  std::string out = "{\"traceEvents\":[\n";
  bool first = true;
  auto event = [&](const std::string& body) {
    if (!first) out += ",\n";
    first = false;
    out += body;
  };

  for (const auto& [rank, p] : processes) {
    std::string label = p.device.empty() ? fmt::format("rank {}", rank) : fmt::format("rank {} ({})", rank, p.device);
    event(fmt::format(R"({{"ph":"M","pid":{},"tid":0,"name":"process_name","args":{{"name":{}}}}})", rank,
                      json_quote(label)));
    event(fmt::format(R"({{"ph":"M","pid":{},"tid":0,"name":"process_sort_index","args":{{"sort_index":{}}}}})",
                      rank, rank));
    if (p.memory != nullptr) {
      event(fmt::format(
          R"({{"ph":"M","pid":{},"tid":0,"name":"process_labels","args":{{"labels":{}}}}})", rank,
          json_quote(fmt::format("peak memory {:.3f} GiB", p.memory->peak_bytes() / (1024.0 * 1024.0 * 1024.0)))));
    }
  }
  for (const auto& [key, stream] : threads) {
    const auto& [rank, tid] = key;
    event(fmt::format(R"({{"ph":"M","pid":{},"tid":{},"name":"thread_name","args":{{"name":{}}}}})", rank, tid,
                      json_quote(stream_label(*stream))));
    event(fmt::format(R"({{"ph":"M","pid":{},"tid":{},"name":"thread_sort_index","args":{{"sort_index":{}}}}})",
                      rank, tid, tid));
  }

  for (const Span& s : trace.spans()) {
    std::string args = fmt::format(R"("op_id":{},"kind":{},"step":{},"bytes":{},"flops":{})", json_quote(s.op_id()),
                                   json_quote(op_kind_name(s.kind())), s.step(), json_number(s.bytes()),
                                   json_number(s.flops()));
    if (s.has_collective()) {
      const CollectiveStats& c = s.collective();
      args += fmt::format(R"(,"ranks":{},"bus_factor":{},"alg_bw_Bps":{},"bus_bw_Bps":{})", c.ranks(),
                          json_number(c.bus_factor()), json_number(c.alg_bw_bps()), json_number(c.bus_bw_bps()));
      if (!c.algorithm().empty()) args += fmt::format(R"(,"algorithm":{})", json_quote(c.algorithm()));
    }
    if (s.routing_host_s() > 0 || s.dispatch_host_s() > 0)
      args += fmt::format(R"(,"routing_host_s":{},"dispatch_host_s":{})", json_number(s.routing_host_s()),
                          json_number(s.dispatch_host_s()));
    std::string_view cat = op_kind_name(s.kind());
    event(fmt::format(R"({{"ph":"X","pid":{},"tid":{},"ts":{},"dur":{},"name":{},"cat":{},"args":{{{}}}}})",
                      s.rank(), chrome_tid(s.stream()), micros(s.start_ns()), micros(s.end_ns() - s.start_ns()),
                      json_quote(s.name().empty() ? s.op_id() : s.name()), json_quote(cat.empty() ? "other" : cat),
                      args));
  }

  const RunInfo& run = trace.run();
  out += fmt::format(
      "\n],\n\"displayTimeUnit\":\"ns\",\n\"otherData\":{{\"run_id\":{},\"source\":{},\"cluster\":{},\"model\":{},"
      "\"workload\":{},\"strategy\":{},\"seed\":{},\"created\":{}}}\n}}\n",
      json_quote(run.run_id()), json_quote(source_name(run.source())), json_quote(run.cluster()),
      json_quote(run.model()), json_quote(run.workload()), json_quote(run.strategy()),
      json_quote(std::to_string(run.seed())), json_quote(run.created()));
  return out;
}

void write_chrome_trace(const Trace& trace, const std::string& path) {
  write_trace_file(path, chrome_trace_json(trace));
}

TraceFormat trace_format_for(const std::string& path) {
  for (std::string_view ext : {".textproto", ".txtpb", ".pbtxt", ".txt"})
    if (ends_with(path, ext)) return TraceFormat::kText;
  return TraceFormat::kBinary;
}

void write_trace(const Trace& trace, const std::string& path, TraceFormat format) {
  std::string bytes;
  if (format == TraceFormat::kText) {
    if (!google::protobuf::TextFormat::PrintToString(trace, &bytes))
      throw TraceError(fmt::format("{}: cannot print the trace in text format", path));
  } else if (!trace.SerializeToString(&bytes)) {
    throw TraceError(fmt::format("{}: cannot serialize the trace", path));
  }
  write_trace_file(path, bytes);
}

void write_trace(const Trace& trace, const std::string& path) { write_trace(trace, path, trace_format_for(path)); }

Trace parse_trace(const std::string& bytes, const std::string& name, TraceFormat format) {
  Trace t;
  Diagnostics diags;
  if (format == TraceFormat::kText) {
    ConfigDocument doc = ConfigDocument::parse_text(bytes, name, &t);
    validate(t, doc.root(&diags));
  } else {
    if (!t.ParseFromString(bytes))
      throw ConfigError({Diagnostic{name, 0, 0, "", "not a binary moesim.trace.Trace (protobuf cannot parse it)"}});
    validate(t, ConfigScope(t, nullptr, name, "", 0, &diags));
  }
  diags.throw_if_any();
  return t;
}

Trace read_trace(const std::string& path) {
  const std::string bytes = read_bytes(path);
  TraceFormat format = trace_format_for(path);
  const bool known_binary = ends_with(path, ".pb") || ends_with(path, ".binpb") || ends_with(path, ".bin");
  if (format == TraceFormat::kBinary && !known_binary && looks_textual(bytes)) format = TraceFormat::kText;
  return parse_trace(bytes, path, format);
}

}  // namespace moesim::trace
