"""Predicted against measured, from `moesim validate` rows (each row's result: the step times and
every matched op's predicted and measured seconds):

    validation-steps   per validate run: the predicted and the measured step time side by side
    validation-ops     every matched op of the most recent validate run, measured (x) against
                       predicted (y) on log axes, coloured by op kind, with the y = x line
    validation-kinds   per op kind, the signed error of every matched op over the most recent
                       validate runs (a suite's passes), with the +-10% band
"""

import statistics

import plot

KIND_RUNS = 30  # a suite of 10 plans in 3 passes


def _validate_runs(runs):
    return [r for r in runs if r.kind == "validate" and r.ok and r.result and r.result.get("measured_step_s")]


def kind_errors(runs):
    """Per op kind, the signed percent error of every matched op of `runs` with a measured time."""
    out = {}
    for r in runs:
        for o in r.result.get("ops", []):
            measured = float(o.get("measured_s", 0) or 0)
            if measured > 0:
                out.setdefault(o.get("kind", "?"), []).append(
                    (float(o.get("predicted_s", 0) or 0) - measured) / measured * 100)
    return out


def _kinds_figure(runs, out_dir):
    shown = runs[-KIND_RUNS:]
    errors = kind_errors(shown)
    if not errors:
        return plot.Skipped("validation-kinds", "Error by op kind", "the validate runs list no ops")
    median_abs = {k: statistics.median(abs(e) for e in v) for k, v in errors.items()}
    kinds = sorted(errors, key=lambda k: (median_abs[k], k))
    fig, (ax,) = plot.new_figure(9.0, 4.5)
    ax.axhspan(-10, 10, color="#55a868", alpha=0.15, linewidth=0)
    ax.axhline(0, color="#888888", linewidth=1)
    ax.boxplot([errors[k] for k in kinds], whis=(5, 95), showfliers=True, flierprops={"markersize": 2})
    ax.set_xticks(range(1, len(kinds) + 1), kinds, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("error (%): + predicted slower")
    ax.set_title("Signed error by op kind")
    listed = ", ".join(f"{k} {median_abs[k]:.1f}%" for k in kinds)
    caption = (f"Every matched (op, rank) of the {len(shown)} most recent validate runs, by kind: box the quartiles, "
               f"whiskers 5-95%, the shaded band +-10%. Median |error|: {listed}.")
    return plot.Made("validation-kinds", "Error by op kind", caption, plot.save(fig, out_dir, "validation-kinds"))


def make(runs, out_dir):
    runs = _validate_runs(runs)
    if not runs:
        return [plot.Skipped("validation-steps", "Predicted vs measured step time", "no validate run in the store"),
                plot.Skipped("validation-ops", "Predicted vs measured ops", "no validate run in the store"),
                plot.Skipped("validation-kinds", "Error by op kind", "no validate run in the store")]
    out = [_kinds_figure(runs, out_dir)]

    shown = runs[-20:]
    fig, (ax,) = plot.new_figure(9.0, 4.0)
    x = list(range(len(shown)))
    predicted = [1e3 * float(r.result.get("predicted_step_s", 0)) for r in shown]
    measured = [1e3 * float(r.result.get("measured_step_s", 0)) for r in shown]
    ax.bar([i - 0.2 for i in x], predicted, width=0.4, label="predicted (simulator)", color="#4c72b0")
    ax.bar([i + 0.2 for i in x], measured, width=0.4, label="measured (executor)", color="#dd8452")
    ax.set_xticks(x, [r.result.get("name", r.id) for r in shown], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("step time (ms)")
    ax.legend(fontsize=8)
    ax.set_title("Predicted vs measured step time")
    caption = (f"The {len(shown)} most recent validate runs: the simulator's step time for the plan's Schedule and "
               "the executor's median step (after the warm-up) on the same Schedule.")
    out.append(plot.Made("validation-steps", "Predicted vs measured step time", caption,
                         plot.save(fig, out_dir, "validation-steps")))

    run = shown[-1]
    ops = run.result.get("ops", [])
    if not ops:
        out.append(plot.Skipped("validation-ops", "Predicted vs measured ops", f"{run.id} lists no ops"))
        return out
    kinds = sorted({o.get("kind", "?") for o in ops})
    fig, (ax,) = plot.new_figure(6.5, 5.5)
    for kind in kinds:
        mine = [o for o in ops if o.get("kind", "?") == kind]
        colour, marker = plot.series_style(kind, kinds)
        ax.scatter([1e6 * float(o.get("measured_s", 0)) for o in mine], [1e6 * float(o.get("predicted_s", 0)) for o in mine],
                   s=14, label=kind, color=colour, marker=marker)
    values = [1e6 * float(o.get(k, 0)) for o in ops for k in ("measured_s", "predicted_s")]
    positive = [v for v in values if v > 0] or [1.0]
    lo, hi = min(positive) / 1.5, max(positive) * 1.5
    ax.plot([lo, hi], [lo, hi], color="#888888", linewidth=1, linestyle="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured (us)")
    ax.set_ylabel("predicted (us)")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"Ops of {run.id} ({run.result.get('name', '')})")
    caption = (f"Every matched (op, rank) of {run.id}: measured by the executor (median over the compared steps) "
               "against predicted by the simulator; points above the dashed line are predicted too slow.")
    out.append(plot.Made("validation-ops", "Predicted vs measured ops", caption, plot.save(fig, out_dir, "validation-ops")))
    return out
