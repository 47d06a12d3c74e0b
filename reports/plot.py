"""What every figure module shares: the style, the deterministic writer and the result types.

Figures are matplotlib Figure objects on the Agg backend (no pyplot state), of fixed sizes, saved
as PNG and SVG with fixed metadata (no dates) and SVG element ids salted by a constant, so the same
store always gives byte-identical files.

A figure module has `make(runs, out_dir) -> list of Made | Skipped`.
"""

import os
import re
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (after the backend is chosen)

DPI = 100
matplotlib.rcParams.update({
    "svg.hashsalt": "moesim-report",  # SVG ids from this salt, not from random numbers
    "svg.fonttype": "path",           # glyphs as paths: the SVG does not depend on installed fonts
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.axisbelow": True,
})
PNG_METADATA = {"Software": "moesim report"}
SVG_METADATA = {"Date": None, "Creator": "moesim report"}

# Step-time categories of sim/engine.h in the order they stack, each with a fixed colour.
CATEGORIES = ["compute", "all_to_all", "all_reduce", "all_gather", "reduce_scatter", "p2p",
              "pipeline_bubble", "offload_stall", "other"]
_PALETTE = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c",
            "#ccb974", "#64b5cd"]


def category_colour(name, known):
    """A fixed colour for a breakdown category; `known` is the sorted list of categories drawn."""
    i = CATEGORIES.index(name) if name in CATEGORIES else len(CATEGORIES) + known.index(name)
    return _PALETTE[i % len(_PALETTE)]


_MARKERS = ["o", "s", "^", "D"]


def series_style(name, known):
    """A colour and a marker for `name` of the list `known` of series drawn in one axes, each
    series its own pair (up to 40): a validate run's 13 op kinds outnumber the colours."""
    i = known.index(name)
    return _PALETTE[i % len(_PALETTE)], _MARKERS[(i // len(_PALETTE)) % len(_MARKERS)]


@dataclass
class Made:
    key: str        # "breakdown", "sweep", "memory", "expert_load", "links"
    title: str
    caption: str    # one or two sentences for report.md
    files: list     # [png, svg] paths


@dataclass
class Skipped:
    key: str
    title: str
    reason: str


def new_figure(width_in, height_in, rows=1, cols=1, **subplot_kw):
    """A figure of a fixed size and its axes (a list, row by row)."""
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **subplot_kw)
    return fig, [ax for row in axes for ax in row]


def save(fig, out_dir, name):
    """Writes NAME.png and NAME.svg under out_dir; returns their paths."""
    png = os.path.join(out_dir, name + ".png")
    svg = os.path.join(out_dir, name + ".svg")
    fig.savefig(png, dpi=DPI, metadata=PNG_METADATA)
    fig.savefig(svg, metadata=SVG_METADATA)
    return [png, svg]


def file_name(text):
    """A file-name-safe form of a sweep name: letters, digits, '.', '_' and '-'."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def seconds(s):
    """2.5 -> "2.5 s", 0.0123 -> "12.3 ms"."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(s) >= scale or unit == "us":
            return f"{s / scale:.3g} {unit}"
    return f"{s} s"
