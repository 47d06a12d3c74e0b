"""Sweep curves: for each sweep in the store, step time (and tokens or samples per second) against
its swept values.

A sweep point is a run of kind "sweep" with id "sweep:<name>:<index>", status "ok" or "invalid",
and metrics "axis.<field path>" (its value on every axis) and "point" (planner/sweep.h). The
store does not say which axes form the grid and which fields only move with another (a sweep
file's `together`), so that is read back from the values: a field whose value is a function of an
earlier field's (in the order the metrics were written, which is the sweep file's) moves with it;
the others are the grid's dimensions, in the file's order.

The first dimension is the x axis, the second gives one line per value, the third one panel per
value; further dimensions are held at their first value (the title says so). Invalid points are
left out of the curves.
"""

import math

from matplotlib import colormaps

import plot

MAX_PANELS = 6


def _function_of(points, f, g):
    """Whether g's value is determined by f's over the points."""
    seen = {}
    for p in points:
        if seen.setdefault(p[f], p[g]) != p[g]:
            return False
    return True


def dimensions(points, fields):
    """Groups the swept fields: [(field, [fields moving with it]), ...] for the fields that vary, in
    `fields` order, and {field: value} for those that never vary."""
    fixed = {f: points[0][f] for f in fields if len({p[f] for p in points}) == 1}
    dims = []
    for f in fields:
        if f in fixed:
            continue
        for head, followers in dims:
            if _function_of(points, head, f) and len({p[f] for p in points}) <= len({p[head] for p in points}):
                followers.append(f)
                break
        else:
            dims.append((f, []))
    return dims, fixed


def _value(v):
    return f"{v:g}" if isinstance(v, float) else str(v)


def _points(runs):
    """The swept fields in the order they were stored, and [({field: value}, run), ...] in point
    order for the points that have a value on every field."""
    points = []
    fields = []
    for r in sorted(runs, key=lambda r: (r.sweep_point(), r.id)):
        axes = {k[len("axis."):]: v for k, v in r.metrics.items() if k.startswith("axis.") and not math.isnan(v)}
        fields += [f for f in axes if f not in fields]
        points.append((axes, r))
    return fields, [(a, r) for a, r in points if all(f in a for f in fields)]


def _sweep_figure(name, runs, out_dir):
    title = f"Sweep {name}"
    fields, points = _points(runs)
    ok = [(a, r) for a, r in points if r.ok and r.step_time_s]
    if not fields or not points:
        return plot.Skipped("sweep", title, "its points carry no axis.<field> metrics")
    if len(ok) < 2:
        return plot.Skipped("sweep", title, f"{len(ok)} of its {len(points)} points ran (status ok): no curve to draw")
    dims, fixed = dimensions([a for a, _ in points], fields)
    if not dims:
        return plot.Skipped("sweep", title, "no swept field takes more than one value")

    tokens = all(r.tokens_per_s for _, r in ok)
    samples = not tokens and all(r.samples_per_s() for _, r in ok)
    metrics = [("step time (s)", lambda r: r.step_time_s)]
    if tokens:
        metrics.append(("tokens/s", lambda r: r.tokens_per_s))
    elif samples:
        metrics.append(("samples/s", lambda r: r.samples_per_s()))

    x_field = dims[0][0]
    line_field = dims[1][0] if len(dims) > 1 else None
    panel_field = dims[2][0] if len(dims) > 2 else None
    held = {d[0]: min(a[d[0]] for a, _ in points) for d in dims[3:]}
    ok = [(a, r) for a, r in ok if all(a[f] == v for f, v in held.items())]
    panel_values = sorted({a[panel_field] for a, _ in ok}) if panel_field else [None]
    shown_panels = panel_values[:MAX_PANELS]
    line_values = sorted({a[line_field] for a, _ in ok}) if line_field else [None]
    x_values = sorted({a[x_field] for a, _ in points})

    log_x = x_values[0] > 0 and x_values[-1] / x_values[0] >= 8  # e.g. 4, 8, 16, 32 GPUs per node
    scale = [math.log(x) for x in x_values] if log_x else x_values
    gaps = [b - a for a, b in zip(scale, scale[1:])]
    label_ticks = len(x_values) <= 12 and (not gaps or min(gaps) >= (scale[-1] - scale[0]) / 25)  # else they overlap
    fig, axes = plot.new_figure(2.5 + 4.0 * len(shown_panels), 1.2 + 3.0 * len(metrics),
                                rows=len(metrics), cols=len(shown_panels), sharex=True, sharey="row")
    colours = [colormaps["viridis"](0.85 * i / max(1, len(line_values) - 1)) for i in range(len(line_values))]
    for row, (ylabel, get) in enumerate(metrics):
        top = 0.0
        for col, pv in enumerate(shown_panels):
            ax = axes[row * len(shown_panels) + col]
            for lv, colour in zip(line_values, colours):
                curve = sorted((a[x_field], get(r)) for a, r in ok
                               if (pv is None or a[panel_field] == pv) and (lv is None or a[line_field] == lv))
                if curve:
                    ax.plot([x for x, _ in curve], [y for _, y in curve], marker="o", markersize=3.5, color=colour,
                            label=None if lv is None else _value(lv))
                    top = max([top] + [y for _, y in curve])
            if col == 0:
                ax.set_ylabel(ylabel)
            if row == 0 and pv is not None:
                ax.set_title(f"{panel_field} = {_value(pv)}", fontsize=8)
            if log_x:
                ax.set_xscale("log", base=2 if all(math.log2(x).is_integer() for x in x_values) else 10)
            if row == len(metrics) - 1 and label_ticks:
                ax.set_xticks(x_values, [_value(x) for x in x_values], fontsize=7)
                ax.minorticks_off()
        axes[row * len(shown_panels)].set_ylim(0, top * 1.08 or 1)  # shared by the row
    fig.supxlabel(x_field + (" (with " + ", ".join(dims[0][1]) + ")" if dims[0][1] else ""), fontsize=9)
    if line_field:
        axes[len(shown_panels) - 1].legend(title=line_field, title_fontsize=7, fontsize=7, loc="upper left",
                                           bbox_to_anchor=(1.02, 1.0))
    notes = [f"{f} = {_value(v)}" for f, v in held.items()]
    if len(panel_values) > len(shown_panels):
        notes.append(f"{len(shown_panels)} of {len(panel_values)} values of {panel_field} shown")
    fig.suptitle(title + (f" ({'; '.join(notes)})" if notes else ""))

    caption = f"{len(ok)} of the sweep's {len(points)} stored points (status ok) against {x_field}"
    if line_field:
        caption += f", one line per {line_field}"
    if panel_field:
        caption += f", one panel per {panel_field}"
    caption += "."
    if fixed:
        caption += " Held fixed: " + ", ".join(f"{f} = {_value(v)}" for f, v in fixed.items()) + "."
    return plot.Made("sweep", title, caption, plot.save(fig, out_dir, "sweep-" + plot.file_name(name)))


def make(runs, out_dir):
    by_name = {}
    for r in runs:
        name = r.sweep_name()
        if name is not None:
            by_name.setdefault(name, []).append(r)
    if not by_name:
        return [plot.Skipped("sweep", "Sweep curves", "no sweep points (runs of kind sweep, id sweep:NAME:POINT)")]
    return [_sweep_figure(name, by_name[name], out_dir) for name in sorted(by_name)]
