"""moesim report: figures (PNG + SVG) and a report.md linking them, from a moesim results store.

    /usr/bin/python3 reports/report.py --db results.db --out report/ [--json]

(`moesim report` runs this.) Reads only the SQLite store, read-only, so any past run can be
re-plotted. Each figure is drawn when the store has its data, and report.md says which were
skipped and why:

    breakdown.{png,svg}      step-time breakdown of the most recent simulate runs and sweep points
    sweep-NAME.{png,svg}     per sweep: step time and throughput against the swept values
    memory.{png,svg}         peak memory per rank against capacity, most recent simulate run
    expert-load.{png,svg}    tokens per expert per MoE layer, most recent run that has it
    links.{png,svg}          busiest links' utilisation, most recent simulate run
    validation-steps.{png,svg}  predicted vs measured step time of the validate runs
    validation-ops.{png,svg}    every op of the most recent validate run, measured vs predicted
    validation-kinds.{png,svg}  per op kind, the signed errors of the recent validate runs
    calibration-history.{png,svg}  the latest calibrated machine's fitted parameters over time

The same store gives byte-identical files. Prints what it wrote (--json: as JSON). Exit codes:
0 ok, 2 bad input (not a moesim store, --out not a folder, matplotlib missing), 1 internal error.
"""

import sys

sys.dont_write_bytecode = True  # no __pycache__ in the source tree

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402


def fail(message):
    print(f"moesim report: {message}", file=sys.stderr)
    sys.exit(2)


try:
    import matplotlib  # noqa: F401
except ImportError:
    fail(f"matplotlib is not installed for {sys.executable}: install Debian's python3-matplotlib "
         "(scripts/install-deps does)")

import breakdown  # noqa: E402
import calibration  # noqa: E402
import experts  # noqa: E402
import links  # noqa: E402
import memory  # noqa: E402
import plot  # noqa: E402
import store  # noqa: E402
import sweeps  # noqa: E402
import validation  # noqa: E402

MAX_TABLE_ROWS = 30


def cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def run_table(runs):
    shown = runs[-MAX_TABLE_ROWS:]
    lines = ["| id | kind | what | step time | tokens/s | MFU | fits |", "|---|---|---|---:|---:|---:|---|"]
    for r in shown:
        step = plot.seconds(r.step_time_s) if r.step_time_s else ""
        if not r.ok:
            step = f"({r.status})"
        if r.tokens_per_s:
            throughput = f"{r.tokens_per_s:,.0f}"
        else:
            throughput = f"{r.samples_per_s():,.1f} samples/s" if r.samples_per_s() else ""
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else ""
        fits = "" if r.fits is None else ("yes" if r.fits else "**no**")
        lines.append(f"| {cell(r.id)} | {r.kind} | {cell(r.label())} | {step} | {throughput} | {mfu} | {fits} |")
    if len(runs) > len(shown):
        lines.append(f"\nThe {len(shown)} most recent of {len(runs)} runs.")
    return "\n".join(lines)


def write_markdown(path, db, runs, outcomes):
    kinds = {}
    for r in runs:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    counts = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    out = ["# moesim report", "", f"From the results store `{db}`: {len(runs)} runs" + (f" ({counts})." if runs else "."), ""]
    if runs:
        out += ["## Runs", "", run_table(runs), ""]
    made = [o for o in outcomes if isinstance(o, plot.Made)]
    skipped = [o for o in outcomes if isinstance(o, plot.Skipped)]
    if made:
        out += ["## Figures", ""]
    for m in made:
        png, svg = (os.path.basename(f) for f in m.files)
        out += [f"### {m.title}", "", m.caption, "", f"![{m.title}]({png})", "", f"[SVG]({svg})", ""]
    if skipped:
        out += ["## Skipped figures", ""] + [f"- **{s.title}**: {s.reason}." for s in skipped] + [""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(out))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db", required=True, help="the SQLite results store")
    parser.add_argument("--out", required=True, help="folder for the figures and report.md (created)")
    parser.add_argument("--json", action="store_true", help="print the files written as JSON")
    args = parser.parse_args()

    try:
        runs = store.load_runs(args.db)
    except store.StoreError as e:
        fail(f"results store {e}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f"--out {args.out}: is a file, not a folder")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        fail(f"--out {args.out}: {e.strerror}")

    outcomes = []
    for module in (breakdown, sweeps, memory, experts, links, validation, calibration):
        outcomes += module.make(runs, args.out)
    report = os.path.join(args.out, "report.md")
    write_markdown(report, args.db, runs, outcomes)

    made = [o for o in outcomes if isinstance(o, plot.Made)]
    skipped = [o for o in outcomes if isinstance(o, plot.Skipped)]
    if args.json:
        print(json.dumps({
            "db": args.db,
            "out": args.out,
            "report": report,
            "runs": len(runs),
            "files": [f for m in made for f in m.files] + [report],
            "figures": [{"figure": m.key, "title": m.title, "png": m.files[0], "svg": m.files[1]} for m in made],
            "skipped": [{"figure": s.key, "title": s.title, "reason": s.reason} for s in skipped],
        }, indent=2))
    else:
        print(f"{report}: {len(runs)} runs, {len(made)} figures (PNG + SVG)")
        for m in made:
            print(f"  {m.title:<30} {m.files[0]}  {os.path.basename(m.files[1])}")
        for s in skipped:
            print(f"  {s.title:<30} skipped: {s.reason}")


if __name__ == "__main__":
    main()
