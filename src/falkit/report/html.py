"""`write_report`: Markdown tables, a tidy CSV, PNG figures and one self-contained HTML page
(inline CSS, images as base64 data URIs, no script), every file written atomically."""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from falkit.errors import FalkitError
from falkit.report import Run, by_setting, load_runs, method_order, recorded
from falkit.report import plots as P
from falkit.report.tables import REPORT_PCTS, accuracy_table, paired_table
from falkit.results import csv_text, write_atomic

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;
max-width:1150px;padding:0 1em;color:#222;line-height:1.4}
h1{border-bottom:2px solid #3b6ea5;padding-bottom:.2em}h2{margin-top:1.8em;color:#3b6ea5}
h3{margin-bottom:.3em;font-size:1.02em}
table.falkit{border-collapse:collapse;margin:.4em 0 1em;font-size:.9em}
table.falkit th,table.falkit td{border:1px solid #ccc;padding:.25em .6em;white-space:nowrap}
table.falkit th{background:#eef3f8}table.falkit td.num{text-align:right;
font-variant-numeric:tabular-nums}table.falkit tr:nth-child(even){background:#fafafa}
p.note{color:#555;font-size:.85em;margin:.2em 0}.warn{background:#fff4e0;border-left:4px solid
#e0a030;padding:.5em 1em}figure{margin:1em 0}.grid{display:grid;gap:0 1em;
grid-template-columns:repeat(auto-fill,minmax(460px,1fr))}figure img{max-width:100%;height:auto;
border:1px solid #ddd}figcaption{font-size:.85em;color:#555}
"""


def _slug(text: str) -> str:
    s = text.replace("α", "a").replace("ρ", "rho").replace("=", "")
    return re.sub(r"[^A-Za-z0-9.@+-]+", "_", s).strip("_")[:80]


def _tidy_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        for m in r.metrics:
            rows.append({"setting": r.setting, "method": r.method, "seed": r.seed,
                         "cycle": m["cycle"], "target_pct": m["target_pct"],
                         "labeled": m["labeled"], "labeled_pct": m["labeled_pct"],
                         "accuracy_pct": round(100 * float(m["accuracy"]), 4),
                         "auc_pct": _pct(m.get("auc")),
                         "complete": r.complete, "run_dir": str(r.dir)})
    return rows


def _pct(value: Any) -> float | str:
    """A fraction as a rounded %; "" where none was recorded (or NaN)."""
    number = recorded(value)
    return "" if number is None else round(100 * number, 4)


def _figure_html(png: bytes, caption: str) -> str:
    b64 = base64.b64encode(png).decode("ascii")
    cap = html.escape(caption)
    return (f'<figure><img alt="{cap}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{cap}</figcaption></figure>")


def _partitions(runs: Sequence[Run]) -> list[tuple[str, list[Run]]]:
    """Distinct partitions (setting + identical counts) with the runs that share each, in
    setting order, then by seed."""
    seen: dict[tuple[str, bytes], list[Run]] = {}
    for setting, group in by_setting(runs).items():
        for r in sorted(group, key=lambda r: r.seed):
            if r.partition is not None:
                key = (setting, r.partition.tobytes() + str(r.partition.shape).encode())
                seen.setdefault(key, []).append(r)
    return [(k[0], v) for k, v in seen.items()]


def write_report(run_dirs: Iterable[str | Path], out_dir: str | Path,
                 pcts: Sequence[float] | None = REPORT_PCTS,
                 include_initial: bool = False,
                 formats: Sequence[str] = ("png",)) -> Path:
    """Write accuracy.md, auc.md (where runs recorded the AUC), paired.md, accuracy.csv
    (tidy: one row per run and cycle),
    figures/*.png (and .pdf/.svg for each of `formats`: vector figures for a paper) and a
    self-contained report.html under ``out_dir``; return the HTML path. Every run is read
    and checked and every file made before the first is written: a damaged run directory
    (a FalkitError) leaves ``out_dir`` as it was."""
    run_dirs = list(run_dirs)
    for fmt in formats:
        if fmt not in P.FORMATS:
            raise FalkitError(f"figure format {fmt!r} is not one of {', '.join(P.FORMATS)}")
    out = Path(out_dir)
    runs = load_runs(run_dirs)
    if not runs:
        where = ", ".join(map(str, run_dirs))
        raise FalkitError(f"no falkit run (metrics.csv + config.toml) under {where}")
    acc = accuracy_table(runs, pcts)
    paired = paired_table(runs)
    files: dict[Path, str | bytes] = {out / "accuracy.md": acc.to_markdown()}
    with_auc = [r for r in runs if r.has_auc()]
    auc = accuracy_table(with_auc, pcts, "auc") if with_auc else None
    if auc is not None:
        files[out / "auc.md"] = auc.to_markdown()
    files[out / "paired.md"] = paired.to_markdown()
    files[out / "accuracy.csv"] = csv_text(_tidy_rows(runs))

    colors = P.method_colors(method_order(runs))
    # (section, file stem, draw(fmt) -> bytes | None)
    drawn: list[tuple[str, str, Callable[[str], bytes | None]]] = []
    groups = by_setting(runs)
    for i, (setting, group) in enumerate(groups.items()):
        tag = f"{i + 1:02d}_{_slug(setting)}"
        drawn.append((setting, f"accuracy_{tag}",
                       lambda f, g=group, s=setting: P.accuracy_figure(g, s, colors, f)))
        drawn.append((setting, f"query_balance_{tag}",
                       lambda f, g=group, s=setting: P.query_balance_figure(
                           g, s, colors, include_initial, f)))
        if any(r.rounds for r in group):
            drawn.append((setting, f"rounds_{tag}",
                          lambda f, g=group, s=setting: P.rounds_figure(g, s, colors, f)))
    for j, (setting, shared) in enumerate(_partitions(runs)):
        seeds = sorted({r.seed for r in shared})
        who = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
        drawn.append(("Partitions", f"partition_{j + 1:02d}_{_slug(setting)}",
                      lambda f, r=shared[0], t=f"{setting} ({who})": P.partition_figure(
                          r.partition, r.class_names, t, r.class_counts, f)))
    figures: list[tuple[str, str, bytes]] = []  # (section, file name, png) for the page
    for section, stem, draw in drawn:
        for fmt in dict.fromkeys(("png", *formats)):
            data = draw(fmt)
            if data is None:
                break
            files[out / "figures" / f"{stem}.{fmt}"] = data
            if fmt == "png":
                figures.append((section, f"{stem}.png", data))

    page = _html_page(runs, acc.to_html() + (auc.to_html() if auc else ""), paired.to_html(),
                      figures, list(groups))
    path = out / "report.html"
    files[path] = page
    for p, data in files.items():
        write_atomic(p, data)
    return path


def _html_page(runs: Sequence[Run], acc_html: str, paired_html: str,
               figures: list[tuple[str, str, bytes]], settings: list[str]) -> str:
    e = html.escape
    methods = method_order(runs)
    seeds = sorted({r.seed for r in runs})
    body = [f"<h1>falkit report</h1><p>{len(runs)} runs, {len(settings)} setting(s), "
            f"methods: {e(', '.join(methods))}; seeds: {e(', '.join(map(str, seeds)))}. "
            f"Generated {datetime.now().strftime('%Y-%m-%d %H:%M')}.</p>"]
    bad = [r for r in runs if not r.complete]
    if bad:
        items = "".join(f"<li>{e(str(r.dir))} ({len(r.metrics)} of "
                        f"{r.config.budget.cycles} cycles)</li>" for r in bad)
        body.append(f'<div class="warn"><b>{len(bad)} incomplete run(s)</b>: counted in '
                    f"accuracy tables and curves where they reached a fraction, not in AULC or "
                    f"the paired statistics.<ul>{items}</ul></div>")
    body += [acc_html, paired_html, "<h2>Figures</h2>"]
    for setting in [*settings, "Partitions"]:
        figs = [(n, p) for s, n, p in figures if s == setting]
        if figs:
            body.append(f"<h3>{e(setting)}</h3>")
            grid = setting == "Partitions" and len(figs) > 1
            body += ['<div class="grid">'] if grid else []
            body += [_figure_html(p, n) for n, p in figs]
            body += ["</div>"] if grid else []
    body.append("<h2>Runs</h2>")
    rows = "".join(
        f"<tr><td>{e(r.setting)}</td><td>{e(r.method)}</td><td class='num'>{r.seed}</td>"
        f"<td class='num'>{len(r.metrics)}</td><td>{'yes' if r.complete else 'no'}</td>"
        f"<td class='num'>{_final_acc(r)}</td><td class='num'>{_final_auc(r)}</td>"
        f"<td>{e(str(r.dir))}</td></tr>" for r in runs)
    body.append('<table class="falkit"><thead><tr><th>setting</th><th>method</th><th>seed</th>'
                "<th>cycles</th><th>complete</th><th>final acc. (%)</th><th>final AUC (%)</th>"
                "<th>directory</th>"
                f"</tr></thead><tbody>{rows}</tbody></table>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>falkit report</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _final_acc(r: Run) -> str:
    y = r.curve()[1]
    return f"{float(y[-1]):.2f}" if np.size(y) else "–"


def _final_auc(r: Run) -> str:
    auc = _pct(r.metrics[-1].get("auc")) if r.metrics else ""
    return f"{auc:.2f}" if auc != "" else "–"
