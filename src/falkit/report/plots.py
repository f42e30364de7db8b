"""Report figures as PNG bytes (matplotlib, Agg, 150 dpi): accuracy vs labeled fraction, the
cumulative class-group shares of queries (FairFAL Figure 2), and the client × class partition.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot), so nothing here touches
global backend state or leaks open figures.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from falkit import stats
from falkit.report import Run, method_order

DPI = 150
_GROUP_TITLE = {"majority": "Majority classes (top 30 %)",
                "intermediate": "Intermediate classes (middle 40 %)",
                "minority": "Minority classes (bottom 30 %)"}


FORMATS = ("png", "pdf", "svg")  # raster for the HTML page; vector for papers


def figure_bytes(fig: Figure, fmt: str = "png") -> bytes:
    """The figure as PNG (at the report's resolution), PDF or SVG bytes."""
    if fmt not in FORMATS:
        raise ValueError(f"figure format {fmt!r} is not one of {', '.join(FORMATS)}")
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=DPI)
    return buf.getvalue()


def method_colors(methods: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """A stable colour per method (tab10, then tab20 for more than 10 methods)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(methods) <= 10 else "tab20"]
    return {m: tuple(cmap(i % cmap.N)) for i, m in enumerate(methods)}


def _line(methods: Sequence[str], m: str) -> dict[str, str]:
    """Solid lines with round markers for the first 20 methods (one tab20 colour each),
    dashed with squares after that, so that no two methods look the same."""
    return {"ls": "-", "marker": "o"} if list(methods).index(m) < 20 else {"ls": "--",
                                                                          "marker": "s"}


def _by_cycle(runs: Sequence[Run], values: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """Per cycle index: mean labeled %, mean and std (ddof=0) of ``values`` over the runs."""
    length = max(len(v) for v in values)
    xs, ms, ss = [], [], []
    for t in range(length):
        have = [i for i, v in enumerate(values) if len(v) > t]
        xs.append(np.mean([runs[i].curve()[0][t] for i in have]))
        vals = np.array([values[i][t] for i in have], dtype=float)
        ms.append(np.nanmean(vals) if np.isfinite(vals).any() else np.nan)
        ss.append(np.nanstd(vals) if np.isfinite(vals).sum() > 1 else 0.0)
    return np.array(xs), np.array(ms), np.array(ss)


def accuracy_figure(runs: Sequence[Run], title: str,
                    colors: dict[str, tuple[float, ...]] | None = None,
                    fmt: str = "png") -> bytes:
    """Accuracy (%) vs labeled (%) per method: mean over seeds with a ±1 std band."""
    methods = method_order(runs)
    colors = colors or method_colors(methods)
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for m in methods:
        mruns = [r for r in runs if r.method == m]
        x, mean, std = _by_cycle(mruns, [r.curve()[1] for r in mruns])
        ax.plot(x, mean, ms=4, lw=1.8, color=colors[m], label=f"{m} (n={len(mruns)})",
                **_line(methods, m))
        ax.fill_between(x, mean - std, mean + std, color=colors[m], alpha=0.18, lw=0)
    ax.set_xlabel("labeled samples (% of the training set)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title(f"Accuracy vs labeled fraction (mean ± std over seeds)\n{title}", fontsize=10)
    fig.legend(loc="outside right upper", fontsize=8, title="method", title_fontsize=8)
    return figure_bytes(fig, fmt)


def rounds_figure(runs: Sequence[Run], title: str,
                  colors: dict[str, tuple[float, ...]] | None = None,
                  fmt: str = "png") -> bytes | None:
    """Test accuracy (%) after FL rounds (rounds.csv, `runtime.eval_every`), per method:
    mean over seeds, the FL rounds of every cycle one after the other (dotted lines mark
    the cycles, each starting from its fresh or continued model)."""
    methods = [m for m in method_order(runs) if any(r.rounds for r in runs if r.method == m)]
    if not methods:
        return None
    colors = colors or method_colors(method_order(runs))
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.add_subplot()
    per_cycle = max(r.config.fl.rounds for r in runs)
    for m in methods:
        by_x: dict[int, list[float]] = {}
        for r in runs:
            if r.method == m:
                for row in r.rounds:
                    x = row["cycle"] * per_cycle + row["round"]
                    by_x.setdefault(x, []).append(100.0 * row["accuracy"])
        xs = sorted(by_x)
        ys = [float(np.mean(by_x[x])) for x in xs]
        for c in sorted({(x - 1) // per_cycle for x in xs}):  # a line per cycle
            seg = [i for i, x in enumerate(xs) if (x - 1) // per_cycle == c]
            ax.plot([xs[i] for i in seg], [ys[i] for i in seg], lw=1.5, ms=3,
                    color=colors[m], label=m if c == 0 else None, **_line(methods, m))
    cycles = max(row["cycle"] for r in runs for row in r.rounds) + 1
    for c in range(1, cycles):
        ax.axvline(c * per_cycle + 0.5, color="0.7", lw=0.8, ls=":")
    ax.set_xlabel(f"FL round (cycles of {per_cycle} rounds one after the other)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.set_title(f"Accuracy per FL round (mean over seeds)\n{title}", fontsize=10)
    fig.legend(loc="outside right upper", fontsize=8, title="method", title_fontsize=8)
    return figure_bytes(fig, fmt)


def query_balance_figure(runs: Sequence[Run], title: str,
                         colors: dict[str, tuple[float, ...]] | None = None,
                         include_initial: bool = False, fmt: str = "png") -> bytes | None:
    """Cumulative share (%) of queried samples from the majority / intermediate / minority
    class groups vs labeled fraction, one panel per group, one line per method (mean over
    seeds). The dashed line is the group's share of the training set (what uniform sampling
    would give). None if no run has partition.csv or nothing was queried."""
    runs = [r for r in runs if r.class_counts is not None and len(r.metrics) > 1 - include_initial]
    if not runs:
        return None
    methods = method_order(runs)
    colors = colors or method_colors(methods)
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    ref = np.zeros(3)
    for r in runs:
        groups = stats.class_groups(r.class_counts)
        total = r.class_counts.sum()
        ref += [r.class_counts[groups[g]].sum() / total for g in stats.GROUPS]
    ref = 100 * ref / len(runs)
    first = 0 if include_initial else 1
    for m in methods:
        mruns = [r for r in runs if r.method == m]
        shares = [100 * r.query_shares(include_initial)[1] for r in mruns]
        for gi, ax in enumerate(axes):
            cols = [np.concatenate([np.full(first, np.nan), s[:, gi]]) for s in shares]
            x, mean, _ = _by_cycle(mruns, cols)
            ax.plot(x[first:], mean[first:], ms=4, lw=1.8, color=colors[m],
                    label=f"{m} (n={len(mruns)})", **_line(methods, m))
    example = stats.class_groups(runs[0].class_counts)
    for gi, (ax, g) in enumerate(zip(axes, stats.GROUPS, strict=True)):
        ax.axhline(ref[gi], color="0.35", ls="--", lw=1.2,
                   label="share in training set" if gi == 0 else None)
        names = [runs[0].class_names[c] for c in example[g]]
        shown = ", ".join(names) if sum(map(len, names)) < 40 else f"{len(names)} classes"
        ax.set_title(f"{_GROUP_TITLE[g]}\nclasses: {shown}", fontsize=9)
        ax.set_xlabel("labeled samples (%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cumulative share of queried samples (%)")
    axes[0].set_ylim(bottom=0)
    what = "all labels incl. the initial random ones" if include_initial else \
        "strategy queries only, initial random labels excluded"
    fig.suptitle(f"Query class balance ({what})\n{title}", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize=8)
    return figure_bytes(fig, fmt)


def partition_figure(counts: np.ndarray, class_names: Sequence[str], title: str,
                     class_counts: np.ndarray | None = None, fmt: str = "png") -> bytes:
    """Heatmap of the client × class training counts (annotated when small enough); class
    labels carry their group (maj / int / min) by global count."""
    counts = np.asarray(counts)
    k, c = counts.shape
    glob = counts.sum(axis=0) if class_counts is None else np.asarray(class_counts)
    groups = stats.class_groups(glob)
    tag = {cls: g[:3] for g in stats.GROUPS for cls in groups[g]}
    fig = Figure(figsize=(min(3.0 + 0.62 * c, 11), min(2.2 + 0.34 * k, 8)),
                 layout="constrained")
    ax = fig.add_subplot()
    # square-root colour scale: long-tailed counts would otherwise leave most cells blank
    norm = PowerNorm(0.5, vmin=0, vmax=max(int(counts.max()), 1))
    im = ax.imshow(counts, aspect="auto", cmap="YlGnBu", interpolation="nearest", norm=norm)
    fig.colorbar(im, ax=ax, label="training samples (sqrt scale)", shrink=0.9)
    if c <= 20:
        labels = [f"{class_names[i] if i < len(class_names) else i}\n{tag[i]}"
                  for i in range(c)]
        ax.set_xticks(range(c), labels, fontsize=8, rotation=0 if c <= 12 else 90)
        ax.set_xlabel("class (group by global count: maj / int / min)")
    else:
        step = max(1, c // 20)
        ax.set_xticks(range(0, c, step), [str(i) for i in range(0, c, step)], fontsize=8)
        ax.set_xlabel("class index")
    step = max(1, k // 25)
    ax.set_yticks(range(0, k, step), [str(i) for i in range(0, k, step)], fontsize=8)
    ax.set_ylabel("client")
    if k * c <= 400:
        for i in range(k):
            for j in range(c):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if norm(counts[i, j]) > 0.6 else "black")
    ax.set_title(f"Client × class partition ({k} clients, {int(counts.sum())} samples)\n{title}",
                 fontsize=10)
    return figure_bytes(fig, fmt)
