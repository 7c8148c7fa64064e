"""The figures of docs/design.md §9, drawn from a report's rows, with the study's published
values beside ours where a grid reproduces one of its figures.

- change bars: each arm's change against `none`, with its paired interval;
- metric vs k: a line per arm that differs only in k (whole numbers), with
  a band (over seeds with two or more, else over dev examples);
- metric vs fraction: the same over fractional k.

An arm is labelled by the axes on which it differs from the others drawn
with it (e.g. `only_output`, or `Random`), which is also how published values
(task -> {"change": {label: change}} or {"curves": {label: {k: value}}}) are
matched to it.
"""

import io

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402

from grid.storage import write_atomically  # noqa: E402

LABEL_AXES = ("retriever", "input_retriever", "output_retriever", "k", "ablation", "order", "rank_offset", "recipe")


def labels(cells: list, ignore=()) -> list:
    """Each cell's label: its values on the axes where the cells differ."""
    varying = [a for a in LABEL_AXES if a not in ignore and len({getattr(c, a) for c in cells}) > 1]
    shown = {"k": "k={}", "rank_offset": "offset={}", "input_retriever": "input={}", "output_retriever": "output={}"}
    return [" ".join(shown.get(a, "{}").format(getattr(c, a)) for a in varying) or c.retriever for c in cells]


def is_fraction(k) -> bool:
    return isinstance(k, float)


def curves(rows: list, fractional: bool) -> dict:
    """label -> rows along k, for arms that differ only in k (at least two k each)."""
    candidates = [r for r in rows if r.values and not r.baseline and is_fraction(r.cell.k) == fractional]
    lines = {}
    for row, label in zip(candidates, labels([r.cell for r in candidates], ignore=("k",))):
        lines.setdefault(label, []).append(row)
    return {label: sorted(line, key=lambda r: r.cell.k) for label, line in lines.items() if len(line) > 1}


def changes(rows: list) -> dict:
    """label -> row, for arms with a change against `none`."""
    compared = [r for r in rows if r.delta is not None]
    return dict(zip(labels([r.cell for r in compared]), compared))


def published_values(rows: list, published: dict) -> dict:
    """arm -> the study's value for it, as text, for the report's table."""
    text = {}
    for label, row in changes(rows).items():
        if label in published.get("change", {}):
            text[row.arm] = f"{published['change'][label]:+.4f} (change)"
    for fractional in (False, True):
        for label, line in curves(rows, fractional).items():
            for row in line:
                value = published.get("curves", {}).get(label, {}).get(row.cell.k)
                if value is not None:
                    text[row.arm] = f"{value:.4f}"
    return text


def over_seeds(rows) -> bool:
    """Bands over seeds where every point has two seeds or more, else over dev examples."""
    return all(r.seeds_low is not None for r in rows)


def save(fig, ax, path) -> None:
    """Legend, layout, and the PNG written whole, as the report's pages are."""
    ax.legend(fontsize=7)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    write_atomically(path, png.getvalue())


def change_bars(task: str, rows: list, published: dict, path) -> str:
    bars = changes(rows)
    study = published.get("change", {})
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(bars) + 1.5), 3.6))
    x = range(len(bars))
    deltas = [r.delta for r in bars.values()]
    errors = [[r.delta - r.low for r in bars.values()], [r.high - r.delta for r in bars.values()]]
    ax.bar(x, deltas, yerr=errors, capsize=4, color="tab:blue", label="lamp-grid (95% paired bootstrap CI)")
    if any(label in study for label in bars):
        shown = [(i, study[label]) for i, label in enumerate(bars) if label in study]
        ax.scatter([i for i, _ in shown], [v for _, v in shown], marker="D", color="tab:orange", zorder=3,
                   label="published (SPEC §9)")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(list(x), list(bars), rotation=20, ha="right")
    ax.set_ylabel(f"change in dev {rows[0].metric} vs none")
    ax.set_title(f"{task}: change against no profile")
    save(fig, ax, path)
    return f"{task}: change in {rows[0].metric} against `none`, per setting, with 95% paired bootstrap CIs"


def metric_curves(task: str, rows: list, fractional: bool, published: dict, path) -> str:
    lines = curves(rows, fractional)
    study = published.get("curves", {})
    seeds = over_seeds([r for line in lines.values() for r in line])
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, (label, line) in enumerate(lines.items()):
        color = f"C{i}"
        ks = [r.cell.k for r in line]
        lows = [r.seeds_low if seeds else r.examples_low for r in line]
        highs = [r.seeds_high if seeds else r.examples_high for r in line]
        ax.plot(ks, [r.value for r in line], marker="o", color=color, label=label)
        ax.fill_between(ks, lows, highs, color=color, alpha=0.2)
        if label in study:
            points = sorted(study[label].items())
            ax.plot([k for k, _ in points], [v for _, v in points], linestyle="--", marker="x", color=color,
                    label=f"{label}, published")
    if fractional:
        ax.set_xlabel("k: fraction of the profile")
    else:
        ax.set_xlabel("k: retrieved items")
        ax.set_xscale("log", base=2)  # the study's k run from 1 to 80
        ticks = sorted({r.cell.k for line in lines.values() for r in line} | {k for c in study.values() for k in c})
        ax.set_xticks(ticks, [str(k) for k in ticks])
        ax.minorticks_off()
    ax.set_ylabel(f"dev {rows[0].metric}")
    ax.set_title(f"{task}: {rows[0].metric} vs {'fraction of the profile' if fractional else 'k'}")
    save(fig, ax, path)
    over = "seeds" if seeds else "dev examples"
    return f"{task}: dev {rows[0].metric} vs {'fraction' if fractional else 'k'}; bands: 95% CI over {over}"


def draw_figures(rows: list, out, published: dict) -> list:
    """Every figure the rows allow, as PNGs in `out`: a list of (task, file name, caption)."""
    drawn = []
    for task in dict.fromkeys(r.task for r in rows):
        mine = [r for r in rows if r.task == task]
        study = published.get(task, {})
        wanted = []
        if changes(mine):
            wanted.append((f"{task}-change.png", lambda path: change_bars(task, mine, study, path)))
        for fractional, name in ((False, "k"), (True, "fraction")):
            if curves(mine, fractional):
                wanted.append((f"{task}-vs-{name}.png",
                               lambda path, f=fractional: metric_curves(task, mine, f, study, path)))
        for name, draw in wanted:
            drawn.append((task, name, draw(out / name)))
    return drawn
