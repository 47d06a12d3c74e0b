// Trace files: export to Chrome-trace / Perfetto JSON, and our own trace (trace.proto) written and
// read back as binary protobuf or text format.
//
// Chrome JSON follows the Trace Event Format (JSON object form; "Trace Event Format" doc,
// docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU):
//   - one complete event per span: {"ph":"X", "ts", "dur", "pid", "tid", "name", "cat", "args"};
//     ts and dur are MICROSECONDS (the format's unit), written exactly from integer nanoseconds
//     (1,500,000 ns -> 1500, 1,234 ns -> 1.234);
//   - pid = rank, named by a process_name metadata event ("rank 3 (node0.gpu3)") and ordered by
//     process_sort_index; peak memory, when known, as a process_labels event;
//   - tid = stream: 1000 x stream kind + index (compute 0 -> 1000, comm 1 -> 2001, copy 0 -> 3000),
//     named by thread_name ("compute 0", "comm 1") and ordered by thread_sort_index;
//   - args: op_id, kind, step, bytes, flops, and alg_bw_Bps, bus_bw_Bps, bus_factor, ranks for
//     collectives; the run's metadata goes to the top-level "otherData".
// Output is deterministic (events in span order after the metadata, one per line) so that it can
// be compared against a checked-in golden file.
#pragma once

#include "traces/trace.pb.h"

#include <string>
#include <string_view>

namespace moesim::trace {

// Thread id of a stream in Chrome JSON: 1000 x kind + index.
int chrome_tid(const Stream& stream);

std::string chrome_trace_json(const Trace& trace);
// Writes chrome_trace_json to `path` (through a temporary file and a rename, so a reader never
// sees half a file). Throws TraceError naming the file when it cannot be written.
void write_chrome_trace(const Trace& trace, const std::string& path);

// `s` as a JSON string literal, quotes included: ", \ and control characters escaped, invalid
// UTF-8 replaced by U+FFFD so that the output is always valid JSON.
std::string json_quote(std::string_view s);

// ---- our own trace files ---------------------------------------------------------------------

enum class TraceFormat { kBinary, kText };

// By extension: .pb, .binpb, .bin -> binary; .textproto, .txtpb, .pbtxt, .txt -> text; none of
// these -> binary.
TraceFormat trace_format_for(const std::string& path);

// Writes `trace` to `path` in `format` (temporary file and rename). Throws TraceError.
void write_trace(const Trace& trace, const std::string& path, TraceFormat format);
void write_trace(const Trace& trace, const std::string& path);  // format from the extension

// Reads a trace written by write_trace (or by hand, in text format). The format comes from the
// extension; for other names, text when the bytes look like text (printable, whitespace or UTF-8
// only), else binary. The trace is validated: every span needs an op id and a kind, 0 <= start_ns
// <= end_ns, bytes and flops >= 0. Throws ConfigError naming the file (and line, in text form)
// with every problem found, also for a missing or unreadable file.
Trace read_trace(const std::string& path);
// The same, from bytes in memory; `name` is the file name used in messages.
Trace parse_trace(const std::string& bytes, const std::string& name, TraceFormat format);

}  // namespace moesim::trace
