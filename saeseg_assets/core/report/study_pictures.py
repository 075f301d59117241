"""Figures of the suppression study: prediction examples in a fixed ADE colour palette, dose-response and
latent-count curves, and the summary's plots, drawn from its typed results. Each returns PNG bytes (see `pictures`)."""

from __future__ import annotations

import colorsys

import numpy as np

from .pictures import figure_png, plt, rates_per_class_png
from .results import Interval, SettingCount, SpecificityGrid, SummaryRow, SweepRow

FORMAT_VERSION = 3  # of the PNG pictures drawn here (a class's and the summary's); 2: intervals drawn; 3: trade-off


def ade_palette() -> np.ndarray:
    """151 RGB colours, the same on every run: 0 ("other") black, classes spread around the hue circle by the
    golden ratio with alternating lightness so neighbouring indices differ."""
    colours = np.zeros((151, 3), dtype=np.uint8)
    for c in range(1, 151):
        hue = (c * 0.618033988749895) % 1.0
        value = (0.95, 0.75, 0.55)[c % 3]
        saturation = (0.85, 0.6)[c % 2]
        colours[c] = np.round(np.array(colorsys.hsv_to_rgb(hue, saturation, value)) * 255).astype(np.uint8)
    return colours


def colourize(labels_HW: np.ndarray, palette: np.ndarray | None = None) -> np.ndarray:
    return (ade_palette() if palette is None else palette)[np.asarray(labels_HW, dtype=np.int64)]


def class_names(indices) -> dict[int, str]:
    """ADE names of label values (0: "other", the unlabelled pixels)."""
    from ..data.ade20k import class_by_index

    return {int(i): "other (unlabelled)" if i == 0 else class_by_index(int(i)).name for i in indices}


def _outline(ax, mask_HW: np.ndarray) -> None:
    """The target's boundary, white under black, visible on any colour."""
    if mask_HW.any() and not mask_HW.all():
        for colour, width in (("white", 2.4), ("black", 1.0)):
            ax.contour(mask_HW.astype(float), levels=[0.5], colors=colour, linewidths=width)


def legend_classes(rows: list[dict], columns: list[tuple[str, str]]) -> list[tuple[int, str]]:
    """(label value, legend text) of every class in the label maps of `rows`: the targets first, then by area."""
    area: dict[int, int] = {}
    for row in rows:
        for name, _ in columns:
            if name != "rgb" and row.get(name) is not None:
                values, counts = np.unique(row[name], return_counts=True)
                for v, n in zip(values.tolist(), counts.tolist()):
                    area[v] = area.get(v, 0) + n
    targets = {int(row["target"]) for row in rows}
    order = sorted(area, key=lambda v: (v not in targets, -area[v], v))
    names = class_names(order)
    return [(v, f"{names[v]} (target, outlined)" if v in targets else names[v]) for v in order]


def label_panels_png(rows: list[dict], columns: list[tuple[str, str]], title: str, max_legend: int = 20,
                     size: float = 2.0) -> bytes:
    """A grid of label maps in the ADE palette, one row per dict of `rows` ("label": the row's caption, "target":
    the class outlined in every panel, "rgb": the image or None, and a label map [H, W] per column name); `columns`
    gives (name, column title); `size`: a panel's side in inches. Below: a legend naming every class that appears,
    by area, targets marked."""
    palette = ade_palette()
    legend = legend_classes(rows, columns)
    n_cols, n_rows = len(columns), max(len(rows), 1)
    legend_cols = min(n_cols + 1, 5)
    n_legend = min(len(legend), max_legend) + (len(legend) > max_legend)
    # Margins in inches, so that panels stay square and nothing overlaps whatever the number of rows.
    gap, left, right = 0.12, 0.4, 0.1
    top = 0.35 + 0.25 * (title.count("\n") + 1)
    bottom = 0.3 + 0.25 * (1 + -(-n_legend // legend_cols)) if legend else 0.2
    width = left + n_cols * size + (n_cols - 1) * gap + right
    height = top + n_rows * size + (n_rows - 1) * gap + bottom
    fig, axes = plt.subplots(n_rows, n_cols, squeeze=False, figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height,
                        wspace=gap / size, hspace=gap / size)
    for r, row in enumerate(rows):
        target_HW = row["ground_truth"] == row["target"]
        for c, (name, heading) in enumerate(columns):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            panel = row.get(name)
            if panel is None:
                ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", fontsize=10, transform=ax.transAxes)
            else:
                ax.imshow(panel if name == "rgb" else colourize(panel, palette), interpolation="nearest")
                _outline(ax, target_HW)
            if r == 0:
                ax.set_title(heading, fontsize=11)
            if c == 0:
                ax.set_ylabel(row["label"], fontsize=10)
    if not rows:
        axes[0][0].text(0.5, 0.5, "no examples", ha="center", va="center")
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=palette[v] / 255, edgecolor="black", linewidth=0.5)
               for v, _ in legend[:max_legend]]
    labels = [text for _, text in legend[:max_legend]]
    if len(legend) > max_legend:
        handles.append(plt.Rectangle((0, 0), 1, 1, fill=False, edgecolor="none"))
        labels.append(f"+{len(legend) - max_legend} more")
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=legend_cols, fontsize=10, frameon=False,
                   title="colours: ADE20K classes (predicted or true)", title_fontsize=10)
    fig.suptitle(title, fontsize=12, y=1 - 0.08 / height, va="top")
    return figure_png(fig)


SETTING_NAMES = {"configured": "original setting", "tuned": "tuned setting"}  # of the suppressions in examples.npz


def example_rows(arrays: dict[str, np.ndarray], settings: dict[str, str]) -> tuple[list[dict], list[tuple[str, str]]]:
    """The rows and columns of `label_panels_png` for a report's examples (core.examples): image | ground truth |
    baseline prediction | the prediction after each suppression of `settings` that the arrays hold."""
    columns = [("rgb", "image"), ("ground_truth", "ground truth"), ("baseline", "before (baseline)"),
               *((name, f"after: {SETTING_NAMES.get(name, name)}") for name in settings if name in arrays)]
    rows = [{"label": str(image_id), "target": int(arrays["class_index"]),
             "rgb": arrays["rgb"][i] if arrays["has_rgb"][i] else None,
             **{name: arrays[name][i] for name, _ in columns[1:]}} for i, image_id in enumerate(arrays["image_ids"])]
    return rows, columns


def examples_png(arrays: dict[str, np.ndarray], class_key: str, settings: dict[str, str]) -> bytes:
    """A report's examples, the class outlined; `settings`: name (configured, tuned) -> the setting in words."""
    rows, columns = example_rows(arrays, settings)
    name = class_names([int(arrays["class_index"])])[int(arrays["class_index"])]
    described = "\n".join(f"{SETTING_NAMES.get(k, k)}: {text}" for k, text in settings.items() if k in arrays)
    return label_panels_png(rows, columns, f"{class_key}: the {len(rows)} validation images with the most {name} "
                            f"pixels, before and after suppression\n{described}")


def dose_response_png(rows: list[SweepRow], title: str) -> bytes:
    """Per mode, change rates and target patch accuracy against the scale, with both controls dashed; scales where
    the class counts as class-specific are shaded."""
    modes = list(dict.fromkeys(r.setting.mode for r in rows))
    fig, axes = plt.subplots(1, max(len(modes), 1), figsize=(5.0 * max(len(modes), 1), 3.8), squeeze=False)
    series = [(lambda r: r.target_change_rate, "target change", "tab:red", "-"),
              (lambda r: r.other_change_rate, "other change", "tab:blue", "-"),
              (lambda r: r.target_patch_accuracy, "target patch acc.", "tab:green", ":"),
              (lambda r: r.random_latents.target_change_rate if r.random_latents else np.nan,
               "random latents: target change", "tab:orange", "--"),
              (lambda r: r.random_direction.target_change_rate if r.random_direction else np.nan,
               "random direction: target change", "tab:purple", "--")]
    bands = [(lambda r: r.target_change_rate_ci, "tab:red"), (lambda r: r.other_change_rate_ci, "tab:blue")]
    for ax, mode in zip(axes[0], modes):
        sub = sorted((r for r in rows if r.setting.mode == mode), key=lambda r: r.setting.scale)
        scales = [r.setting.scale for r in sub]
        for value, label, colour, style in series:
            ax.plot(scales, [value(r) for r in sub], style, color=colour, marker="o", markersize=4, label=label)
        for ci, colour in bands:
            low, high = _bounds([ci(r) for r in sub])
            ax.fill_between(scales, low, high, color=colour, alpha=0.15, linewidth=0)
        # A band from halfway to each neighbouring scale, so a single specific scale is plainly visible.
        edges = [scales[0] - 0.25, *((a + b) / 2 for a, b in zip(scales, scales[1:])), scales[-1] + 0.25]
        for i, r in enumerate(sub):
            if r.specific:
                ax.axvspan(edges[i], edges[i + 1], color="tab:green", alpha=0.15, linewidth=0)
        ax.set_title(mode.replace("_", " "), fontsize=11)
        ax.set_xlabel("scale (x max activation)", fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.tick_params(labelsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of patches", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    any_specific = any(r.specific for r in rows)
    handles.append(plt.Rectangle((0, 0), 1, 1, color="tab:green", alpha=0.15))
    labels.append("green: scales where class-specific" if any_specific else
                  "class-specific at no scale (would be green)")
    handles.append(plt.Rectangle((0, 0), 1, 1, color="tab:red", alpha=0.15))
    labels.append("bands: 95% intervals over images")
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=10, frameon=False)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    return figure_png(fig)


def latent_count_png(rows: list[SweepRow], scale: float, title: str) -> bytes:
    """Target and other change rates, with 95% intervals, against the number of suppressed latents, at one scale,
    one line per mode; the modes' points side by side so that their bars do not hide each other."""
    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    modes = list(dict.fromkeys(r.setting.mode for r in rows))
    shown: set[int] = set()
    for i, (mode, style) in enumerate(zip(modes, ("-", "--"))):
        sub = sorted((r for r in rows if r.setting.mode == mode and r.setting.scale == scale),
                     key=lambda r: r.setting.n_latents)
        n_latents = np.array([r.setting.n_latents for r in sub], dtype=float)
        shown.update(int(n) for n in n_latents)
        x = n_latents * 1.06 ** (i - (len(modes) - 1) / 2)  # a nudge on the log axis
        for value, ci, colour, name in ((lambda r: r.target_change_rate, lambda r: r.target_change_rate_ci,
                                         "tab:red", "target"),
                                        (lambda r: r.other_change_rate, lambda r: r.other_change_rate_ci,
                                         "tab:blue", "other")):
            y = np.array([value(r) for r in sub], dtype=float)
            ax.errorbar(x, y, yerr=_error_bars(y, [ci(r) for r in sub]), fmt=style, color=colour, marker="o",
                        markersize=4, capsize=3, label=f"{name} change, {mode.replace('_', ' ')}")
    ax.set_xscale("log")
    ticks = sorted(shown)
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.minorticks_off()
    ax.set_xlabel("N: latents suppressed (top N of the ranking)", fontsize=10)
    ax.set_ylabel("share of patches changed", fontsize=10)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    ax.set_title(f"{title}\nat {scale:g} x max (bars: 95% intervals over images)", fontsize=11)
    fig.tight_layout()
    return figure_png(fig)


def _bounds(cis: list[Interval | None]) -> tuple[np.ndarray, np.ndarray]:
    """The lows and highs of intervals (NaN where there is none)."""
    low = np.array([c.low if c is not None and c.low is not None else np.nan for c in cis], dtype=float)
    high = np.array([c.high if c is not None and c.high is not None else np.nan for c in cis], dtype=float)
    return low, high


def _error_bars(values: np.ndarray, cis: list[Interval | None]) -> np.ndarray:
    """matplotlib's yerr ([2, n]: below, above) of intervals around values; 0 where there is no interval."""
    low, high = _bounds(cis)
    return np.nan_to_num(np.clip(np.stack([values - low, high - values]), 0, None))


def tradeoff_png(rows: list[SweepRow], marked: dict[str, SweepRow], config, title: str) -> bytes:
    """Every validation setting of `rows` as a point, other change rate (x) against target change rate (y), with its
    95% intervals; the region the rule's first two criteria allow shaded (target >= min_target_change and >=
    other_factor x other; the controls decide within it); the settings of `marked` (name -> row: the configured and
    the tuned one) drawn larger, with their controls' target change at the same other change rate."""
    fig, ax = plt.subplots(figsize=(6.2, 5.2))
    x = np.linspace(0, 1, 201)
    floor = np.maximum(config.min_target_change, config.other_factor * x)
    ax.fill_between(x, floor, 1.02, where=floor <= 1.02, color="tab:green", alpha=0.12, linewidth=0,
                    label=f"target >= {config.min_target_change:g} and >= {config.other_factor:g} x other")
    for mode, marker in zip(dict.fromkeys(r.setting.mode for r in rows), ("o", "s")):
        sub = [r for r in rows if r.setting.mode == mode]
        other = np.array([r.other_change_rate for r in sub], dtype=float)
        target = np.array([r.target_change_rate for r in sub], dtype=float)
        ax.errorbar(other, target, xerr=_error_bars(other, [r.other_change_rate_ci for r in sub]),
                    yerr=_error_bars(target, [r.target_change_rate_ci for r in sub]), fmt=marker, color="grey",
                    markersize=4, alpha=0.6, elinewidth=0.6,
                    label=f"{sub[0].setting.rule} ranking, every N and scale, {mode.replace('_', ' ')}")
    styles = {"configured": ("tab:red", "*", 16), "tuned": ("tab:blue", "D", 9)}
    for name, row in marked.items():
        colour, marker, size = styles.get(name, ("black", "P", 10))
        other, target = np.array([row.other_change_rate]), np.array([row.target_change_rate])
        ax.errorbar(other, target, xerr=_error_bars(other, [row.other_change_rate_ci]),
                    yerr=_error_bars(target, [row.target_change_rate_ci]), fmt=marker, color=colour,
                    markersize=size, markeredgecolor="black", zorder=4, label=f"{name} setting")
        for control, control_marker in ((row.random_latents, "^"), (row.random_direction, "v")):
            if control is not None:
                ax.plot([control.other_change_rate], [control.target_change_rate], control_marker, color=colour,
                        markersize=7, markerfacecolor="white", zorder=3)
    ax.plot([], [], "^", color="black", markerfacecolor="white", label="its random-latent control")
    ax.plot([], [], "v", color="black", markerfacecolor="white", label="its random-direction control")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("other change rate (share of the other patches changed)", fontsize=10)
    ax.set_ylabel("target change rate (share of the class's patches changed)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    ax.set_title(f"{title}\n(bars: 95% intervals over images)", fontsize=11)
    fig.tight_layout()
    return figure_png(fig)


def change_rates_png(rows: list[SummaryRow], title: str) -> bytes:
    """Per class at the configured setting: target change rate (dot, filled when class-specific), other change rate,
    and both controls' target change rates, side by side."""
    keys = [r.class_key for r in rows]
    patch = [r.configured.patch for r in rows]
    target, other = [p.target_change_rate for p in patch], [p.other_change_rate for p in patch]
    random_latents = [p.random_latents.target_change_rate for p in patch]
    random_direction = [p.random_direction.target_change_rate for p in patch]
    cis = [[p.target_change_rate_ci for p in patch], [p.other_change_rate_ci for p in patch],
           [p.random_latents.target_change_rate_ci for p in patch],
           [p.random_direction.target_change_rate_ci for p in patch]]
    specific = [r.configured.specific for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(keys) + 2), 4.4))
    x = np.arange(len(keys))
    series = [(target, "tab:red", "o", "target change", -0.21), (other, "tab:blue", "s", "other change", -0.07),
              (random_latents, "tab:orange", "^", "random latents: target", 0.07),
              (random_direction, "tab:purple", "v", "random direction: target", 0.21)]
    for (values, colour, marker, label, offset), ci in zip(series, cis):
        values = np.array(values, dtype=float)
        ax.errorbar(x + offset, values, yerr=_error_bars(values, ci), fmt="none", ecolor=colour, elinewidth=1,
                    capsize=2, zorder=2)
        ax.scatter(x + offset, values, color=colour, marker=marker, label=label, zorder=3,
                   facecolors=["tab:red" if s else "white" for s in specific] if marker == "o" else colour)
    return rates_per_class_png(fig, ax, keys, title + "\n(filled circle: class-specific; bars: 95% intervals over "
                               "images)")


def specific_counts_png(counts: list[SettingCount], n_classes: int, title: str) -> bytes:
    """Number of class-specific classes against the scale, one line per mode."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for mode in dict.fromkeys(c.mode for c in counts):
        sub = sorted((c for c in counts if c.mode == mode), key=lambda c: c.scale)
        ax.plot([c.scale for c in sub], [c.counts.n_specific for c in sub], marker="o", label=mode)
    ax.set_xlabel("scale (x max activation)", fontsize=10)
    ax.set_ylabel(f"class-specific classes (of {n_classes})", fontsize=10)
    ax.set_ylim(-0.3, max(n_classes, 1) + 0.3)
    ax.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if counts:
        ax.legend(fontsize=9)
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return figure_png(fig)


UNMET_MARKS = {"target": "T", "other": "O", "control": "C", "undefined": "?"}  # a heatmap cell's failed criterion


def specificity_heatmap_png(grid: SpecificityGrid, criteria: str = "T target, O other, C control") -> bytes:
    """Classes (rows) by settings (columns): green where the class counts as class-specific, grey where not, blank
    where not measured; each cell shows the target over the other change rate and, where not specific, a letter for
    the first criterion of the rule it fails (`criteria`: the letters in words, text.criteria_words). The configured
    setting's column is framed; the grid's groups are drawn above the columns and parted by lines."""
    rows, columns, specific, target = grid.rows, grid.columns, grid.specific, grid.target
    fig, ax = plt.subplots(figsize=(2.6 + 0.8 * max(len(columns), 1), 2.6 + 0.5 * max(len(rows), 1)))
    colours = {True: (0.6, 0.85, 0.55), False: (0.88, 0.88, 0.88), None: (1.0, 1.0, 1.0)}
    image = np.array([[colours[None if v is None else bool(v)] for v in line] for line in specific] or
                     [[colours[None]]])
    ax.imshow(image, aspect="auto", interpolation="nearest")
    for i, line in enumerate(target):
        for j, value in enumerate(line):
            if specific[i][j] is None:
                continue
            other, unmet = grid.other[i][j], grid.unmet[i][j]
            text = "\n".join(["-" if v is None or not np.isfinite(v) else f"{v:.2f}" for v in (value, other)])
            ax.text(j, i, text, ha="center", va="center", fontsize=8, linespacing=1.0,
                    fontweight="bold" if specific[i][j] else "normal")
            if unmet:
                ax.text(j + 0.46, i - 0.44, UNMET_MARKS[unmet], ha="right", va="top", fontsize=7, color="darkred")
    if grid.configured >= 0:
        ax.add_patch(plt.Rectangle((grid.configured - 0.5, -0.5), 1, len(rows), fill=False, edgecolor="black",
                                   linewidth=2.5, linestyle="--", zorder=4))
        ax.text(grid.configured, len(rows) - 0.5 + 0.05 * len(rows), "configured", ha="center", va="top",
                fontsize=9)
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right", fontsize=9)
    ax.set_yticks(range(len(rows)), rows, fontsize=9)
    ax.set_xticks(np.arange(-0.5, len(columns)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1.5)
    ax.tick_params(which="minor", length=0)
    for label, start, end in grid.groups:
        ax.text((start + end - 1) / 2, -0.7, label, ha="center", va="bottom", fontsize=10)
        if start > 0:
            ax.axvline(start - 0.5, color="black", linewidth=2)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=colours[v], edgecolor="grey") for v in (True, False)]
    handles += [plt.Rectangle((0, 0), 1, 1, fill=False, edgecolor="none")] * 2
    fig.legend(handles, ["class-specific", "not class-specific",
                         "each cell: target change over other change",
                         f"letter: the criterion failed: {criteria}"],
               loc="lower center", ncol=2, fontsize=9, frameon=False)
    ax.set_title(grid.title, fontsize=11, pad=24)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return figure_png(fig)
