"""How a machine's calibrations move, from `moesim calibrate --db` rows (each row's result: the
CalibrateResult of cli/cli.proto):

    calibration-history  the most recently calibrated machine's fitted parameters over its
                         calibrations, each against its median over them

On a machine shared with other tenants the fits move from one calibration to the next (the
development VM's in-step gather factor by 1.8x within six minutes): the spread is how far a
prediction from one calibration can be off at another time, whatever the model.
"""

import statistics

import plot

# CalibrateResult fields drawn, with their labels, when every calibration of the machine has them.
PARAMETERS = [
    ("peak_flops", "GEMM peak"),
    ("memory_bandwidth_Bps", "memory bandwidth"),
    ("link_bandwidth_Bps", "link bandwidth"),
    ("link_rendezvous_s", "rendezvous over the eager limit"),
    ("all_reduce_efficiency", "all-reduce efficiency"),
    ("in_situ_factor", "kernels in a step"),
    ("half_gather_factor", "gathers in a step (small)"),
    ("in_situ_gather_factor", "gathers in a step"),
    ("in_situ_gather_backward_factor", "backward gathers in a step"),
    ("alone_gather_time_factor", "gathers of a rank alone"),
    ("op_overhead_s", "per-op overhead"),
    ("routing_choice_s", "gate routing per choice"),
    ("dispatch_choice_s", "dispatch decision per choice"),
]
MAX_CALIBRATIONS = 30
WIDEST = 3  # parameters the caption names


def _calibrations(runs):
    """The most recently calibrated machine and its calibrate runs (ok, with a result), oldest first."""
    done = [r for r in runs if r.kind == "calibrate" and r.ok and r.result]
    if not done:
        return "", []
    machine = done[-1].result.get("machine", "")
    return machine, [r for r in done if r.result.get("machine", "") == machine][-MAX_CALIBRATIONS:]


def spreads(calibrations):
    """Per drawn parameter (label): its values over the calibrations, each over their median."""
    out = {}
    for field, label in PARAMETERS:
        values = [float(r.result.get(field, 0) or 0) for r in calibrations]
        if all(v > 0 for v in values):
            median = statistics.median(values)
            out[label] = [v / median for v in values]
    return out


def make(runs, out_dir):
    machine, calibrations = _calibrations(runs)
    if len(calibrations) < 2:
        reason = (f"{len(calibrations)} calibration of {machine} in the store (2 or more show how they move)"
                  if calibrations else "no calibrate run in the store")
        return [plot.Skipped("calibration-history", "Calibrations over time", reason)]
    ratios = spreads(calibrations)
    fig, (ax,) = plot.new_figure(9.0, 4.5)
    x = list(range(len(calibrations)))
    labels = sorted(ratios)
    for i, label in enumerate(labels):  # the palette's ten colours, then again dotted with other markers
        colour, marker = plot.series_style(label, labels)
        ax.plot(x, ratios[label], marker=marker, markersize=3, linewidth=1, label=label, linestyle="-" if i < 10 else ":",
                color=colour)
    ax.axhline(1.0, color="#888888", linewidth=1, linestyle="--")
    ax.set_xticks(x, [r.id for r in calibrations], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("value / its median")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"Calibrations of {machine}")
    widest = sorted(ratios.items(), key=lambda kv: max(kv[1]) / min(kv[1]), reverse=True)[:WIDEST]
    named = ", ".join(f"{label} {min(v):.2f}-{max(v):.2f}x" for label, v in widest)
    caption = (f"{len(calibrations)} calibrations of {machine}, oldest first: each fitted parameter against its "
               f"median over them. The widest: {named}.")
    return [plot.Made("calibration-history", "Calibrations over time", caption,
                      plot.save(fig, out_dir, "calibration-history"))]
