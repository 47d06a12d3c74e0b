"""Read-only access to a moesim results store (traces/store.h has the schema).

Only Python's sqlite3 and the store's tables are used, so any past run can be re-plotted:

    runs         one row per run (kind simulate, run, plan, sweep, validate); result_json holds the
                 command's full result (simulate and sweep points: the SimulateResult message of
                 cli/cli.proto printed with the .proto field names)
    run_metrics  (run_id, name, value): sweep points carry "point" and "axis.<field path>"

Runs come back in insertion order (the runs table's rowid), which is also the order in which they
finished; `created` only has one-second resolution.
"""

import json
import math
import os
import sqlite3
from dataclasses import dataclass, field

APPLICATION_ID = 0x4D4F4553  # "MOES", the SQLite header's application_id of moesim's stores
SCHEMA_VERSION = 2           # the newest schema these scripts know (Store::kSchemaVersion)


class StoreError(Exception):
    """The file is not a moesim store these scripts can read (exit 2)."""


@dataclass
class Run:
    id: str
    kind: str
    created: str
    cluster: str
    model: str
    workload: str
    strategy: str
    step_time_s: float | None
    tokens_per_s: float | None
    mfu: float | None
    peak_memory_bytes: float | None
    fits: bool | None
    status: str
    result: dict | None                          # result_json parsed; None when empty or not JSON
    metrics: dict = field(default_factory=dict)  # name -> value, in insertion order

    @property
    def ok(self):
        return self.status == "ok"

    def label(self):
        """What the run was: "<scenario or model> / <strategy>" from the file names."""
        r = self.result or {}
        what = r.get("scenario") or _stem(self.model) or _stem(self.cluster)
        strategy = _stem(self.strategy)
        return f"{what} / {strategy}" if what and strategy and strategy != what else (what or strategy or self.kind)

    def samples_per_s(self):
        r = self.result or {}
        v = r.get("samples_per_s") or self.metrics.get("samples_per_s")
        return float(v) if v else None

    def sweep_point(self):
        """The point's index: its "point" metric, else the number its id ends with."""
        if "point" in self.metrics:
            return self.metrics["point"]
        tail = self.id.rsplit(":", 1)[-1]
        return int(tail) if tail.isdigit() else math.inf

    def sweep_name(self):
        """"nvlink-domain" for a sweep point "sweep:nvlink-domain:17", else None."""
        if self.kind != "sweep" or not self.id.startswith("sweep:") or ":" not in self.id[6:]:
            return None
        return self.id[6:].rsplit(":", 1)[0]


def latest_with(runs, key):
    """The most recent simulate run whose result has a non-empty `key`, else the most recent sweep
    point's (a store holding only a sweep still gets the figure); None when none has it."""
    for kind in ("simulate", "sweep"):
        found = [r for r in runs if r.kind == kind and r.ok and (r.result or {}).get(key)]
        if found:
            return found[-1]
    return None


def _stem(path):
    name = os.path.basename(path or "")
    for suffix in (".plan.textproto", ".textproto"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _parse(text):
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def load_runs(path):
    """Every run of the store at `path`, oldest first, with its metrics. Raises StoreError."""
    if not os.path.isfile(path):
        raise StoreError(f"{path}: no such file")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise StoreError(f"{path}: cannot open: {e}") from e
    try:
        try:
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.Error as e:
            raise StoreError(f"{path}: not a moesim results store ({e})") from e
        if app_id != APPLICATION_ID or version is None:
            raise StoreError(f"{path}: not a moesim results store")
        if int(version[0]) > SCHEMA_VERSION:
            raise StoreError(f"{path}: written by a newer moesim (schema {version[0]}; these scripts read up to "
                             f"{SCHEMA_VERSION})")
        metrics = {}
        for run_id, name, value in db.execute("SELECT run_id, name, value FROM run_metrics ORDER BY rowid"):
            metrics.setdefault(run_id, {})[name] = float("nan") if value is None else float(value)
        runs = []
        for row in db.execute("SELECT id, kind, created, cluster, model, workload, strategy, step_time_s, tokens_per_s, "
                              "mfu, peak_memory_bytes, fits, status, result_json FROM runs ORDER BY rowid"):
            *head, fits, status, result_json = row
            runs.append(Run(*head, fits=None if fits is None else bool(fits), status=status,
                            result=_parse(result_json), metrics=metrics.get(row[0], {})))
        return runs
    finally:
        db.close()
