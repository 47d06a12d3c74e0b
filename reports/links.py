"""Link utilisation: the busiest directed links of the most recent simulate run that lists them
(the result's `busiest_links`; without one, the most recent sweep point), as
bytes / (capacity x step time), with the bytes carried."""

import plot
import store


def _bytes(n):
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def make(runs, out_dir):
    title = "Link utilisation"
    run = store.latest_with(runs, "busiest_links")
    if run is None:
        return [plot.Skipped("links", title, "no simulate run or sweep point that lists its busiest links")]
    links = run.result["busiest_links"]
    rows = list(range(len(links)))[::-1]  # the busiest at the top
    util = [100.0 * float(l.get("utilisation", 0)) for l in links]

    fig, (ax,) = plot.new_figure(9.0, 1.2 + 0.3 * len(links))
    ax.barh(rows, util, height=0.7, color="#55a868")
    for y, u, link in zip(rows, util, links):
        ax.text(u, y, f" {_bytes(float(link.get('bytes', 0)))} at {float(link.get('capacity_Bps', 0)) / 1e9:.4g} GB/s",
                va="center", fontsize=7)
    ax.set_yticks(rows, [f"{l.get('from', '?')} → {l.get('to', '?')}" for l in links], fontsize=7)
    ax.set_xlim(0, max(util) * 1.6 or 1)  # room for the labels
    ax.set_xlabel("utilisation over the step (%)")
    ax.grid(axis="y", visible=False)
    ax.set_title(f"{title}: {run.id} ({run.label()})")
    caption = (f"The {len(links)} busiest directed links of {run.id} ({run.label()}): bytes carried over the step "
               "divided by capacity x step time.")
    return [plot.Made("links", title, caption, plot.save(fig, out_dir, "links"))]
