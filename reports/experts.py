"""Expert load: tokens kept per expert in every MoE layer (the result's `expert_load`, summed over
the step's micro-batches and EP groups), for the most recent run that has it.

Left: a heat map of each expert's load relative to its layer's mean (1 = balanced). Right: the
tokens per expert of the most imbalanced layer (busiest / mean), with the mean drawn across.
"""

import math

import plot


def _layers(run):
    layers = []
    for entry in (run.result or {}).get("expert_load") or []:
        load = [float(v) for v in entry.get("tokens_per_expert") or []]
        if load and sum(load) > 0:
            layers.append((int(entry.get("layer", 0)), entry.get("name") or f"layer {entry.get('layer', 0)}", load))
    return sorted(layers)


def make(runs, out_dir):
    title = "Expert load"
    latest = [r for r in runs if r.kind in ("simulate", "sweep") and r.ok and _layers(r)]
    if not latest:
        return [plot.Skipped("expert_load", title, "no run with a per-layer expert load (result expert_load)")]
    run = latest[-1]
    layers = _layers(run)
    experts = max(len(load) for _, _, load in layers)
    relative = [[v / (sum(load) / len(load)) for v in load] + [math.nan] * (experts - len(load)) for _, _, load in layers]
    worst = max(range(len(layers)), key=lambda i: (max(relative[i][: len(layers[i][2])]), -i))
    _, worst_name, worst_load = layers[worst]

    fig, (heat, bars) = plot.new_figure(12.0, 1.6 + min(6.0, 0.22 * len(layers)) + 1.0, cols=2,
                                        gridspec_kw={"width_ratios": [1.4, 1.0]})
    image = heat.imshow(relative, aspect="auto", interpolation="nearest", cmap="magma",
                        vmin=0, vmax=max(2.0, max(max(v for v in row if not math.isnan(v)) for row in relative)))
    heat.grid(False)
    heat.set_xlabel("expert")
    heat.set_ylabel("MoE layer")
    step = max(1, len(layers) // 24)
    heat.set_yticks(range(0, len(layers), step), [layers[i][1] for i in range(0, len(layers), step)], fontsize=7)
    heat.set_title("tokens per expert / layer mean")
    fig.colorbar(image, ax=heat, fraction=0.04)

    bars.bar(range(len(worst_load)), worst_load, width=0.85 if len(worst_load) <= 64 else 1.0, color="#dd8452",
             linewidth=0)
    mean = sum(worst_load) / len(worst_load)
    bars.axhline(mean, color="black", linewidth=1, linestyle="--", label=f"mean {mean:.4g}")
    bars.set_xlabel("expert")
    bars.set_ylabel("tokens")
    bars.set_title(f"{worst_name}: busiest / mean = {max(worst_load) / mean:.2f}")
    bars.legend(fontsize=7)
    fig.suptitle(f"{title}: {run.id} ({run.label()})")
    caption = (f"Tokens kept per expert in each of the {len(layers)} MoE layers of {run.id} ({run.label()}), "
               f"relative to the layer's mean, and the most imbalanced layer ({worst_name}) in tokens.")
    return [plot.Made("expert_load", title, caption, plot.save(fig, out_dir, "expert-load"))]
