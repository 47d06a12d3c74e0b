#include "traces/store.h"

#include "traces/recorder.h"

#include <fmt/format.h>
#include <sqlite3.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <source_location>
#include <thread>

namespace moesim {
namespace {

namespace fs = std::filesystem;

// SQLite's application_id header field for moesim's stores: "MOES".
constexpr int32_t kApplicationId = 0x4d4f4553;
constexpr int kBusyTimeout_ms = 30000;

// Schema steps: migration i takes a store from version i to version i + 1 (kMigrations[0] creates
// it). Append only; a step's SQL never changes once released.
struct Migration {
  int to_version;
  const char* sql;
};

constexpr Migration kMigrations[] = {
    {1,
     "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
     "CREATE TABLE runs ("
     "  id TEXT PRIMARY KEY,"
     "  kind TEXT NOT NULL,"
     "  created TEXT NOT NULL,"
     "  cluster TEXT NOT NULL DEFAULT '',"
     "  model TEXT NOT NULL DEFAULT '',"
     "  workload TEXT NOT NULL DEFAULT '',"
     "  strategy TEXT NOT NULL DEFAULT '',"
     "  seed INTEGER NOT NULL DEFAULT 0,"
     "  step_time_s REAL,"
     "  tokens_per_s REAL,"
     "  mfu REAL,"
     "  peak_memory_bytes REAL,"
     "  fits INTEGER CHECK (fits IN (0, 1)),"
     "  result_json TEXT NOT NULL DEFAULT '',"
     "  status TEXT NOT NULL DEFAULT 'ok');"
     "CREATE INDEX runs_by_kind ON runs (kind, created);"
     "CREATE TABLE traces ("
     "  run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,"
     "  source TEXT NOT NULL,"
     "  span_count INTEGER NOT NULL,"
     "  duration_ns INTEGER NOT NULL,"
     "  trace BLOB NOT NULL,"
     "  PRIMARY KEY (run_id, source));"
     "CREATE TABLE run_metrics ("
     "  run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,"
     "  name TEXT NOT NULL,"
     "  value REAL,"
     "  PRIMARY KEY (run_id, name));"},
    // 2: what a run was computed from, so results can be told apart and reproduced.
    {2,
     "ALTER TABLE runs ADD COLUMN inputs_hash TEXT NOT NULL DEFAULT '';"
     "ALTER TABLE runs ADD COLUMN version TEXT NOT NULL DEFAULT '';"},
};
static_assert(std::size(kMigrations) == Store::kSchemaVersion, "one migration per schema version");

constexpr std::array<std::pair<RunKind, std::string_view>, 6> kRunKindNames = {{
    {RunKind::kSimulate, "simulate"},
    {RunKind::kRun, "run"},
    {RunKind::kPlan, "plan"},
    {RunKind::kSweep, "sweep"},
    {RunKind::kValidate, "validate"},
    {RunKind::kCalibrate, "calibrate"},
}};

std::string where(const std::source_location& loc) {
  return fmt::format("{}:{}", fs::path(loc.file_name()).filename().string(), loc.line());
}

}  // namespace

StoreError::StoreError(std::string path, std::string message)
    : std::runtime_error(fmt::format("{}: {}", path, message)), path_(std::move(path)), message_(std::move(message)) {}

std::string_view run_kind_name(RunKind kind) {
  for (const auto& [k, name] : kRunKindNames)
    if (k == kind) return name;
  return "";
}

std::optional<RunKind> parse_run_kind(std::string_view name) {
  for (const auto& [k, n] : kRunKindNames)
    if (n == name) return k;
  return std::nullopt;
}

namespace {

// An open SQLite connection with the file it is for; what Store::Impl holds.
struct Connection {
  std::string path;
  sqlite3* db = nullptr;
  int version = 0;
  mutable std::mutex mu;

  Connection() = default;
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  ~Connection() {
    if (db != nullptr) sqlite3_close_v2(db);
  }

  // Throws StoreError for a failed call: what was done, sqlite3_errmsg (or `message`), the code,
  // and where in moesim.
  [[noreturn]] void fail(std::string what, int rc, const std::source_location& loc, std::string message = {}) const {
    std::string msg = !message.empty() ? std::move(message) : db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    if (const int sys = db != nullptr ? sqlite3_system_errno(db) : 0; sys != 0 && (rc & 0xff) == SQLITE_CANTOPEN)
      msg += fmt::format(" ({})", std::strerror(sys));
    std::string hint;
    if ((rc & 0xff) == SQLITE_NOTADB || (rc & 0xff) == SQLITE_CORRUPT)
      hint = "; the file is damaged or not a SQLite database, left as it is";
    throw StoreError(path, fmt::format("{}: {} (SQLite error {}: {}){} [{}]", what, msg, rc, sqlite3_errstr(rc), hint,
                                       where(loc)));
  }

  // Checks the result of a SQLite call that should have returned SQLITE_OK.
  void check(int rc, const char* what, const std::source_location loc = std::source_location::current()) const {
    if (rc != SQLITE_OK) fail(what, rc, loc);
  }

  void exec(const char* sql, const std::source_location loc = std::source_location::current()) const {
    char* err = nullptr;
    int rc = sqlite3_exec(db, sql, nullptr, nullptr, &err);
    if (rc == SQLITE_OK) return;
    std::string msg = err != nullptr ? err : "";
    sqlite3_free(err);
    fail(fmt::format("executing \"{:.60}\"", sql), rc, loc, std::move(msg));
  }
};

// A prepared statement; every call checked.
class Statement {
 public:
  Statement(const Connection& store, const char* sql, const std::source_location loc = std::source_location::current())
      : store_(store) {
    int rc = sqlite3_prepare_v2(store_.db, sql, -1, &stmt_, nullptr);
    if (rc != SQLITE_OK) store_.fail(fmt::format("preparing \"{:.60}\"", sql), rc, loc);
  }
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;
  ~Statement() { sqlite3_finalize(stmt_); }

  Statement& bind(int i, std::string_view text, const std::source_location loc = std::source_location::current()) {
    return checked(sqlite3_bind_text64(stmt_, i, text.data(), text.size(), SQLITE_TRANSIENT, SQLITE_UTF8), loc);
  }
  Statement& bind(int i, const char* text, const std::source_location loc = std::source_location::current()) {
    return bind(i, std::string_view(text), loc);
  }
  Statement& bind(int i, const std::string& text, const std::source_location loc = std::source_location::current()) {
    return bind(i, std::string_view(text), loc);
  }
  Statement& bind(int i, int64_t v, const std::source_location loc = std::source_location::current()) {
    return checked(sqlite3_bind_int64(stmt_, i, v), loc);
  }
  Statement& bind(int i, double v, const std::source_location loc = std::source_location::current()) {
    if (std::isnan(v)) return bind_null(i, loc);  // SQLite would store NULL anyway; say so
    return checked(sqlite3_bind_double(stmt_, i, v), loc);
  }
  Statement& bind(int i, std::optional<double> v, const std::source_location loc = std::source_location::current()) {
    return v ? bind(i, *v, loc) : bind_null(i, loc);
  }
  Statement& bind(int i, std::optional<bool> v, const std::source_location loc = std::source_location::current()) {
    return v ? bind(i, static_cast<int64_t>(*v ? 1 : 0), loc) : bind_null(i, loc);
  }
  Statement& bind_blob(int i, const std::string& bytes, const std::source_location loc = std::source_location::current()) {
    return checked(sqlite3_bind_blob64(stmt_, i, bytes.data(), bytes.size(), SQLITE_TRANSIENT), loc);
  }
  Statement& bind_null(int i, const std::source_location loc = std::source_location::current()) {
    return checked(sqlite3_bind_null(stmt_, i), loc);
  }

  // True while there is a row; false when done.
  bool step(const std::source_location loc = std::source_location::current()) {
    int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    store_.fail(fmt::format("running \"{:.60}\"", sqlite3_sql(stmt_)), rc, loc);
  }
  // Runs a statement that returns no rows.
  void run(const std::source_location loc = std::source_location::current()) {
    while (step(loc)) {
    }
  }

  bool is_null(int col) const { return sqlite3_column_type(stmt_, col) == SQLITE_NULL; }
  int64_t int64(int col) const { return sqlite3_column_int64(stmt_, col); }
  double real(int col) const { return is_null(col) ? std::nan("") : sqlite3_column_double(stmt_, col); }
  std::optional<double> optional_real(int col) const {
    return is_null(col) ? std::nullopt : std::optional<double>(sqlite3_column_double(stmt_, col));
  }
  std::string text(int col) const {
    const unsigned char* p = sqlite3_column_text(stmt_, col);
    const int n = sqlite3_column_bytes(stmt_, col);
    return p == nullptr ? std::string() : std::string(reinterpret_cast<const char*>(p), static_cast<size_t>(n));
  }
  std::string blob(int col) const {
    const void* p = sqlite3_column_blob(stmt_, col);
    const int n = sqlite3_column_bytes(stmt_, col);
    return p == nullptr ? std::string() : std::string(static_cast<const char*>(p), static_cast<size_t>(n));
  }

 private:
  Statement& checked(int rc, const std::source_location& loc) {
    if (rc != SQLITE_OK) store_.fail("binding a parameter", rc, loc);
    return *this;
  }

  const Connection& store_;
  sqlite3_stmt* stmt_ = nullptr;
};

// BEGIN IMMEDIATE (takes the write lock up front, so two writers never deadlock on an upgrade);
// rolled back unless committed.
class Transaction {
 public:
  explicit Transaction(const Connection& store) : store_(store) { store_.exec("BEGIN IMMEDIATE"); }
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  ~Transaction() {
    if (!done_) sqlite3_exec(store_.db, "ROLLBACK", nullptr, nullptr, nullptr);  // nothing to do if it fails
  }
  void commit() {
    store_.exec("COMMIT");
    done_ = true;
  }

 private:
  const Connection& store_;
  bool done_ = false;
};

// What is at `path` before SQLite sees it: refuse what is not ours to open.
void check_path(const std::string& path) {
  std::error_code ec;
  fs::file_status st = fs::status(path, ec);
  if (ec && ec != std::errc::no_such_file_or_directory && ec != std::errc::not_a_directory)
    throw StoreError(path, fmt::format("cannot open the results store: {}", ec.message()));
  if (fs::exists(st)) {
    if (fs::is_directory(st)) throw StoreError(path, "is a directory, not a results store file");
    if (!fs::is_regular_file(st)) throw StoreError(path, "is not a regular file, cannot hold a results store");
    std::ifstream in(path, std::ios::binary);
    if (!in) throw StoreError(path, fmt::format("cannot read the results store: {}", std::strerror(errno)));
    char header[16] = {};
    in.read(header, sizeof header);
    const std::streamsize got = in.gcount();
    static constexpr char kMagic[16] = {'S', 'Q', 'L', 'i', 't', 'e', ' ', 'f', 'o', 'r', 'm', 'a', 't', ' ', '3', '\0'};
    if (got > 0 && (got < 16 || std::memcmp(header, kMagic, 16) != 0))
      throw StoreError(path, "is not a SQLite database, so not a moesim results store; left untouched");
    return;  // an existing SQLite file, or an empty file (SQLite makes a database of it)
  }
  fs::path parent = fs::path(path).parent_path();
  if (parent.empty()) parent = ".";
  if (!fs::exists(parent, ec)) throw StoreError(path, fmt::format("folder {} does not exist", parent.string()));
  if (!fs::is_directory(parent, ec)) throw StoreError(path, fmt::format("{} is not a folder", parent.string()));
}

RunRecord read_run(const Statement& q, const std::string& path) {
  // Columns in the order of kRunColumns.
  RunRecord r;
  r.id = q.text(0);
  const std::string kind = q.text(1);
  std::optional<RunKind> k = parse_run_kind(kind);
  if (!k) throw StoreError(path, fmt::format("run '{}' has an unknown kind '{}'", r.id, kind));
  r.kind = *k;
  r.created = q.text(2);
  r.cluster = q.text(3);
  r.model = q.text(4);
  r.workload = q.text(5);
  r.strategy = q.text(6);
  r.seed = static_cast<uint64_t>(q.int64(7));
  r.step_time_s = q.optional_real(8);
  r.tokens_per_s = q.optional_real(9);
  r.mfu = q.optional_real(10);
  r.peak_memory_bytes = q.optional_real(11);
  if (!q.is_null(12)) r.fits = q.int64(12) != 0;
  r.result_json = q.text(13);
  r.status = q.text(14);
  r.inputs_hash = q.text(15);
  r.version = q.text(16);
  return r;
}

constexpr const char* kRunColumns =
    "id, kind, created, cluster, model, workload, strategy, seed, step_time_s, tokens_per_s, mfu, "
    "peak_memory_bytes, fits, result_json, status, inputs_hash, version";

bool run_exists(const Connection& s, const std::string& id) {
  Statement q(s, "SELECT 1 FROM runs WHERE id = ?1");
  q.bind(1, id);
  return q.step();
}

void require_run(const Connection& s, const std::string& id) {
  if (!run_exists(s, id)) throw StoreError(s.path, fmt::format("no run '{}' in the store", id));
}

void insert_trace(const Connection& s, const std::string& run_id, const trace::Trace& t) {
  const std::string_view source = trace::source_name(t.run().source());
  if (source.empty())
    throw StoreError(s.path, fmt::format("a trace of run '{}' has no source (predicted or measured)", run_id));
  int64_t first = 0, last = 0;
  for (int i = 0; i < t.spans_size(); ++i) {
    first = i == 0 ? t.spans(i).start_ns() : std::min(first, t.spans(i).start_ns());
    last = i == 0 ? t.spans(i).end_ns() : std::max(last, t.spans(i).end_ns());
  }
  std::string blob;
  if (!t.SerializeToString(&blob))
    throw StoreError(s.path, fmt::format("the {} trace of run '{}' cannot be serialized", source, run_id));
  Statement q(s, "SELECT 1 FROM traces WHERE run_id = ?1 AND source = ?2");
  q.bind(1, run_id).bind(2, source);
  if (q.step()) throw StoreError(s.path, fmt::format("run '{}' already has a {} trace", run_id, source));
  Statement ins(s, "INSERT INTO traces (run_id, source, span_count, duration_ns, trace) VALUES (?1, ?2, ?3, ?4, ?5)");
  ins.bind(1, run_id).bind(2, source).bind(3, static_cast<int64_t>(t.spans_size())).bind(4, last - first);
  ins.bind_blob(5, blob);
  ins.run();
}

void upsert_metrics(const Connection& s, const std::string& run_id, const std::vector<RunMetric>& metrics) {
  for (const RunMetric& m : metrics) {
    if (m.name.empty()) throw StoreError(s.path, fmt::format("a metric of run '{}' has no name", run_id));
    Statement q(s,
                "INSERT INTO run_metrics (run_id, name, value) VALUES (?1, ?2, ?3) "
                "ON CONFLICT (run_id, name) DO UPDATE SET value = excluded.value");
    q.bind(1, run_id).bind(2, m.name).bind(3, m.value);
    q.run();
  }
}

// Brings the store to kSchemaVersion inside one transaction, or refuses a file that is not a
// moesim store of a version this build knows. Runs before WAL mode is set: a refused file keeps
// every byte.
void prepare_schema(Connection& s) {
  Transaction tx(s);
  int32_t app_id = 0;
  {
    Statement q(s, "PRAGMA application_id");
    if (q.step()) app_id = static_cast<int32_t>(q.int64(0));
  }
  int64_t objects = 0;
  bool has_meta = false;
  {
    Statement q(s, "SELECT count(*), coalesce(sum(type = 'table' AND name = 'meta'), 0) FROM sqlite_master");
    if (q.step()) {
      objects = q.int64(0);
      has_meta = q.int64(1) > 0;
    }
  }
  int version = 0;
  if (objects > 0 || app_id != 0) {
    if (app_id != 0 && app_id != kApplicationId)
      throw StoreError(s.path, fmt::format("is a SQLite database of another application (application_id {:#x}), "
                                           "not a moesim results store; left untouched",
                                           static_cast<uint32_t>(app_id)));
    if (!has_meta)
      throw StoreError(s.path, "is a SQLite database of another schema (no moesim `meta` table), not a moesim "
                               "results store; left untouched");
    Statement q(s, "SELECT value FROM meta WHERE key = 'schema_version'");
    std::string text = q.step() ? q.text(0) : std::string();
    char* end = nullptr;
    errno = 0;
    const long v = std::strtol(text.c_str(), &end, 10);
    if (text.empty() || *end != '\0' || errno != 0 || v < 1 || v > std::numeric_limits<int>::max())
      throw StoreError(s.path, fmt::format("has no valid schema_version in its `meta` table (found '{}'); "
                                           "not a moesim results store, left untouched", text));
    version = static_cast<int>(v);
    if (version > Store::kSchemaVersion)
      throw StoreError(s.path, fmt::format("was written by a newer moesim (schema version {}; this moesim knows up to "
                                           "{}); upgrade moesim to open it", version, Store::kSchemaVersion));
  }
  for (const Migration& m : kMigrations) {
    if (m.to_version <= version) continue;
    s.exec(m.sql);
    Statement q(s,
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?1) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value");
    q.bind(1, std::to_string(m.to_version));
    q.run();
    version = m.to_version;
  }
  if (app_id == 0) s.exec(fmt::format("PRAGMA application_id = {}", kApplicationId).c_str());
  tx.commit();
  s.version = version;
}

// Switching to WAL needs the database alone for a moment, and SQLite answers "database is locked"
// at once, without waiting in its busy handler, while another connection holds it (two processes
// creating the store together: seen in CI under load). So it retries, as long as the busy timeout.
void set_wal(const Connection& s) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(kBusyTimeout_ms);
  for (;;) {
    {
      Statement q(s, "PRAGMA journal_mode");
      if (q.step() && q.text(0) == "wal") return;
    }
    const int rc = sqlite3_exec(s.db, "PRAGMA journal_mode = WAL", nullptr, nullptr, nullptr);
    if (rc == SQLITE_OK) return;
    if ((rc & 0xff) != SQLITE_BUSY || std::chrono::steady_clock::now() >= deadline)
      s.fail("running \"PRAGMA journal_mode = WAL\"", rc, std::source_location::current());
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

}  // namespace

struct Store::Impl : Connection {};

Store::Store(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Store::Store(Store&&) noexcept = default;
Store& Store::operator=(Store&&) noexcept = default;
Store::~Store() = default;

Store Store::open(const std::string& path) {
  check_path(path);
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  int rc = sqlite3_open_v2(path.c_str(), &impl->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX,
                           nullptr);
  if (rc != SQLITE_OK) impl->fail("cannot open the results store", rc, std::source_location::current());
  impl->check(sqlite3_extended_result_codes(impl->db, 1), "enabling extended result codes");
  impl->check(sqlite3_busy_timeout(impl->db, kBusyTimeout_ms), "setting the busy timeout");
  if (sqlite3_db_readonly(impl->db, "main") == 1)
    throw StoreError(path, "cannot be written (read-only file or folder); the results store needs write access");
  impl->exec("PRAGMA foreign_keys = ON");
  prepare_schema(*impl);
  set_wal(*impl);
  return Store(std::move(impl));
}

int Store::schema_version() const { return impl_->version; }
const std::string& Store::path() const { return impl_->path; }

std::string Store::insert_run(const RunRecord& run, const std::vector<RunMetric>& metrics,
                              const std::vector<trace::Trace>& traces) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  const std::string_view kind = run_kind_name(run.kind);
  if (kind.empty()) throw StoreError(impl_->path, fmt::format("run '{}' has an invalid kind", run.id));
  Transaction tx(*impl_);
  std::string id = run.id;
  if (id.empty()) {
    Statement q(*impl_, "SELECT coalesce(max(rowid), 0) FROM runs");
    int64_t n = q.step() ? q.int64(0) : 0;
    do {
      id = fmt::format("{}-{}", kind, ++n);
    } while (run_exists(*impl_, id));
  } else if (run_exists(*impl_, id)) {
    throw StoreError(impl_->path, fmt::format("a run with id '{}' is already stored", id));
  }
  Statement q(*impl_,
              "INSERT INTO runs (id, kind, created, cluster, model, workload, strategy, seed, step_time_s, "
              "tokens_per_s, mfu, peak_memory_bytes, fits, result_json, status, inputs_hash, version) "
              "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)");
  q.bind(1, id).bind(2, kind).bind(3, run.created.empty() ? trace::utc_now_iso8601() : run.created);
  q.bind(4, run.cluster).bind(5, run.model).bind(6, run.workload).bind(7, run.strategy);
  q.bind(8, static_cast<int64_t>(run.seed));
  q.bind(9, run.step_time_s).bind(10, run.tokens_per_s).bind(11, run.mfu).bind(12, run.peak_memory_bytes);
  q.bind(13, run.fits).bind(14, run.result_json).bind(15, run.status).bind(16, run.inputs_hash).bind(17, run.version);
  q.run();
  upsert_metrics(*impl_, id, metrics);
  for (const trace::Trace& t : traces) insert_trace(*impl_, id, t);
  tx.commit();
  return id;
}

void Store::add_trace(const std::string& run_id, const trace::Trace& t) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  Transaction tx(*impl_);
  require_run(*impl_, run_id);
  insert_trace(*impl_, run_id, t);
  tx.commit();
}

void Store::put_metrics(const std::string& run_id, const std::vector<RunMetric>& metrics) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  Transaction tx(*impl_);
  require_run(*impl_, run_id);
  upsert_metrics(*impl_, run_id, metrics);
  tx.commit();
}

void Store::set_status(const std::string& run_id, const std::string& status) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  Transaction tx(*impl_);
  require_run(*impl_, run_id);
  Statement q(*impl_, "UPDATE runs SET status = ?2 WHERE id = ?1");
  q.bind(1, run_id).bind(2, status);
  q.run();
  tx.commit();
}

std::optional<RunRecord> Store::find_run(const std::string& id) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  Statement q(*impl_, fmt::format("SELECT {} FROM runs WHERE id = ?1", kRunColumns).c_str());
  q.bind(1, id);
  if (!q.step()) return std::nullopt;
  return read_run(q, impl_->path);
}

std::vector<RunRecord> Store::list_runs(std::optional<RunKind> kind) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::vector<RunRecord> out;
  Statement q(*impl_, fmt::format("SELECT {} FROM runs WHERE ?1 IS NULL OR kind = ?1 ORDER BY rowid", kRunColumns).c_str());
  if (kind) {
    q.bind(1, run_kind_name(*kind));
  } else {
    q.bind_null(1);
  }
  while (q.step()) out.push_back(read_run(q, impl_->path));
  return out;
}

std::optional<trace::Trace> Store::find_trace(const std::string& run_id, trace::Source source) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  Statement q(*impl_, "SELECT trace FROM traces WHERE run_id = ?1 AND source = ?2");
  q.bind(1, run_id).bind(2, trace::source_name(source));
  if (!q.step()) return std::nullopt;
  trace::Trace t;
  if (!t.ParseFromString(q.blob(0)))
    throw StoreError(impl_->path, fmt::format("the {} trace of run '{}' is damaged (does not parse)",
                                              trace::source_name(source), run_id));
  return t;
}

std::vector<TraceSummary> Store::trace_summaries(const std::string& run_id) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::vector<TraceSummary> out;
  Statement q(*impl_, "SELECT source, span_count, duration_ns FROM traces WHERE run_id = ?1 ORDER BY source DESC");
  q.bind(1, run_id);
  while (q.step()) {
    TraceSummary s;
    s.source = trace::parse_source(q.text(0)).value_or(trace::SOURCE_UNSPECIFIED);
    s.span_count = q.int64(1);
    s.duration_ns = q.int64(2);
    out.push_back(s);
  }
  return out;
}

std::map<std::string, double> Store::metrics(const std::string& run_id) const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::map<std::string, double> out;
  Statement q(*impl_, "SELECT name, value FROM run_metrics WHERE run_id = ?1");
  q.bind(1, run_id);
  while (q.step()) out[q.text(0)] = q.real(1);
  return out;
}

}  // namespace moesim
