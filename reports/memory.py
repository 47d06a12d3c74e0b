"""Memory per rank: each simulated rank's peak bytes against its device's capacity, for the most
recent simulate run (its result's `ranks`; without one, the most recent sweep point). Ranks that
overflow are drawn in red."""

import plot
import store

GiB = 2.0 ** 30


def make(runs, out_dir):
    title = "Memory per rank"
    run = store.latest_with(runs, "ranks")
    if run is None:
        return [plot.Skipped("memory", title, "no simulate run or sweep point with per-rank memory (result ranks)")]
    ranks = sorted(run.result["ranks"], key=lambda p: int(p.get("rank", 0)))
    xs = list(range(len(ranks)))
    peak = [float(p.get("peak_bytes", 0)) / GiB for p in ranks]
    capacity = [float(p.get("capacity_bytes", 0)) / GiB for p in ranks]
    fits = [bool(p.get("fits", True)) for p in ranks]

    fig, (ax,) = plot.new_figure(min(14.0, 7.0 + 0.1 * len(ranks)), 4.2)
    ax.bar(xs, peak, width=0.8, color=["#4c72b0" if f else "#c44e52" for f in fits], label="peak")
    ax.scatter(xs, capacity, marker="_", s=max(40, 4000 / len(ranks)), color="black", linewidths=1.5, zorder=3,
               label="capacity")
    if len(ranks) <= 32:
        ax.set_xticks(xs, [f"r{p.get('rank', 0)}\ns{p.get('stage', 0)}" for p in ranks], fontsize=7)
    ax.set_xlabel("simulated rank (r) and pipeline stage (s)")
    ax.set_ylabel("GiB")
    ax.set_ylim(0, max(peak + capacity) * 1.1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    ax.set_title(f"{title}: {run.id} ({run.label()})")
    over = sum(not f for f in fits)
    caption = (f"Peak memory of each simulated rank of {run.id} ({run.label()}) against its device's capacity; "
               + (f"{over} rank(s) do not fit (red)." if over else "every rank fits."))
    if any(int(p.get("represents", 1)) > 1 for p in ranks):
        caption += " The schedule is folded: each simulated rank stands for its data-parallel replicas."
    return [plot.Made("memory", title, caption, plot.save(fig, out_dir, "memory"))]
