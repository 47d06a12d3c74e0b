"""Step-time breakdown bars: seconds per category (compute, exposed communication by kind, pipeline
bubble, ...) stacked per run, for the most recent simulate runs and sweep points.

Two panels when some run's bottleneck rank (the one that waits least for other stages) differs
from its critical rank (the last to finish): the critical rank's breakdown and the bottleneck's.
"""

import plot

MAX_RUNS = 20


def _breakdown(run, key):
    parts = (run.result or {}).get(key) or {}
    return {k: float(v) for k, v in parts.items() if float(v) > 0}


def make(runs, out_dir):
    title = "Step-time breakdown"
    chosen = [r for r in runs if r.kind in ("simulate", "sweep") and r.ok and _breakdown(r, "breakdown")]
    if not chosen:
        return [plot.Skipped("breakdown", title, "no simulate run or sweep point with a step-time breakdown")]
    chosen = chosen[-MAX_RUNS:]
    panels = [("breakdown", "critical rank (the last to finish)")]
    if any(_breakdown(r, "bottleneck_breakdown") and _breakdown(r, "bottleneck_breakdown") != _breakdown(r, "breakdown")
           for r in chosen):
        panels.append(("bottleneck_breakdown", "bottleneck rank (waits least for other stages)"))
    extra = sorted({c for r in chosen for key, _ in panels for c in _breakdown(r, key)} - set(plot.CATEGORIES))
    categories = [c for c in plot.CATEGORIES + extra
                  if any(c in _breakdown(r, key) for r in chosen for key, _ in panels)]

    fig, axes = plot.new_figure(6.0 * len(panels) + 4.0, 1.6 + 0.4 * len(chosen), cols=len(panels), sharey=True)
    labels = [f"{r.id}\n{r.label()}" for r in chosen]
    rows = list(range(len(chosen)))[::-1]  # the newest run at the bottom, as in the run table
    for ax, (key, what) in zip(axes, panels):
        left = [0.0] * len(chosen)
        for c in categories:
            widths = [_breakdown(r, key).get(c, 0.0) for r in chosen]
            ax.barh(rows, widths, left=left, height=0.7, label=c,
                    color=plot.category_colour(c, extra), edgecolor="white", linewidth=0.4)
            left = [a + b for a, b in zip(left, widths)]
        for y, total in zip(rows, left):
            ax.text(total, y, " " + plot.seconds(total), va="center", fontsize=7)
        ax.set_xlim(0, max(left) * 1.18)
        ax.set_xlabel("seconds")
        ax.set_title(what)
        ax.grid(axis="y", visible=False)
    axes[0].set_yticks(rows, labels, fontsize=7)
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.suptitle(title)
    caption = (f"Seconds per category of the step, for the {len(chosen)} most recent simulate runs and sweep points"
               " (bars of different runs share one axis: read small ones by their totals).")
    if len(panels) == 1:
        caption += " The bottleneck rank is the critical rank in every run shown."
    return [plot.Made("breakdown", title, caption, plot.save(fig, out_dir, "breakdown"))]
