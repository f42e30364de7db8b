"""Paper-style tables: accuracy at labeled fractions (FairFAL Tables 5/6) and paired statistics
over seeds (FairFAL Table 1), renderable as terminal text, Markdown and HTML."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from falkit import stats
from falkit.errors import FalkitError
from falkit.report import Run, by_setting, method_order

REPORT_PCTS = (15, 25, 35, 45)


@dataclass
class Cell:
    """One table cell: its text plus the numbers behind it (for tests and further use)."""

    text: str
    value: float | None = None
    std: float | None = None
    n: int = 0
    bold: bool = False


@dataclass
class Section:
    """One titled table (one setting): a header and rows of cells."""

    title: str
    columns: list[str]
    rows: list[list[Cell]]
    notes: list[str] = field(default_factory=list)

    def row(self, label: str) -> list[Cell]:
        """The row whose first cell reads ``label``."""
        for r in self.rows:
            if r[0].text == label:
                return r
        raise KeyError(label)

    def cell(self, label: str, column: str) -> Cell:
        """The cell in row ``label`` and column ``column``."""
        return self.row(label)[self.columns.index(column)]


def _is_numeric(col: int, rows: list[list[Cell]]) -> bool:
    return col > 0 and any(r[col].value is not None for r in rows)


@dataclass
class Table:
    """A titled list of sections; ``str(table)`` is the terminal rendering."""

    title: str
    sections: list[Section]
    notes: list[str] = field(default_factory=list)

    def section(self, title: str) -> Section:
        for s in self.sections:
            if s.title == title:
                return s
        raise KeyError(title)

    def to_text(self, ansi: bool = False) -> str:
        """Aligned plain text; bold cells get a trailing '*' (or ANSI bold if ``ansi``)."""
        out = [self.title, "=" * len(self.title)]
        for s in self.sections:
            texts = [s.columns] + [[c.text + ("*" if c.bold and not ansi else "") for c in r]
                                   for r in s.rows]
            widths = [max(len(t[i]) for t in texts) for i in range(len(s.columns))]
            num = [_is_numeric(i, s.rows) for i in range(len(s.columns))]

            def line(cells: list[str], bold: list[bool], num: list[bool] = num,
                     widths: list[int] = widths) -> str:
                parts = []
                for t, b, w, right in zip(cells, bold, widths, num, strict=True):
                    t = t.rjust(w) if right else t.ljust(w)
                    parts.append(f"\x1b[1m{t}\x1b[0m" if b and ansi else t)
                return "  ".join(parts).rstrip()

            out += ["", s.title, line(s.columns, [False] * len(widths)),
                    "  ".join("-" * w for w in widths)]
            out += [line(t, [c.bold for c in r]) for t, r in zip(texts[1:], s.rows, strict=True)]
            out += s.notes
        return "\n".join(out + ([""] + self.notes if self.notes else []))

    def to_markdown(self) -> str:
        out = [f"## {self.title}"]
        for s in self.sections:
            out += ["", f"### {s.title}", ""]
            out.append("| " + " | ".join(_md(c) for c in s.columns) + " |")
            out.append("|" + "|".join("---:" if _is_numeric(i, s.rows) else ":---"
                                      for i in range(len(s.columns))) + "|")
            for r in s.rows:
                out.append("| " + " | ".join(f"**{_md(c.text)}**" if c.bold else _md(c.text)
                                             for c in r) + " |")
            if s.notes:
                out += [""] + [f"{n}  " for n in s.notes]
        if self.notes:
            out += [""] + [f"{n}  " for n in self.notes]
        return "\n".join(out) + "\n"

    def to_html(self) -> str:
        out = [f"<h2>{html.escape(self.title)}</h2>"]
        for s in self.sections:
            out.append(f"<h3>{html.escape(s.title)}</h3>")
            out.append('<table class="falkit"><thead><tr>'
                       + "".join(f"<th>{html.escape(c)}</th>" for c in s.columns)
                       + "</tr></thead><tbody>")
            for r in s.rows:
                tds = []
                for i, c in enumerate(r):
                    cls = ' class="num"' if _is_numeric(i, s.rows) else ""
                    t = html.escape(c.text)
                    tds.append(f"<td{cls}>{'<b>' + t + '</b>' if c.bold else t}</td>")
                out.append("<tr>" + "".join(tds) + "</tr>")
            out.append("</tbody></table>")
            out += [f'<p class="note">{html.escape(n)}</p>' for n in s.notes]
        out += [f'<p class="note">{html.escape(n)}</p>' for n in self.notes]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.to_text()


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _mean_std_cell(values: Sequence[float], row_n: int) -> Cell:
    """mean ± sample std (ddof = 1); '(n=k)' when fewer runs than the row's n contributed."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return Cell("–")
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if v.size > 1 else math.nan
    text = f"{mean:.2f}" if v.size == 1 else f"{mean:.2f} ± {std:.2f}"
    if v.size != row_n:
        text += f" (n={v.size})"
    return Cell(text, mean, std, int(v.size))


def _bold_best(rows: list[list[Cell]], col: int) -> None:
    vals = [r[col].value for r in rows if r[col].value is not None]
    if vals:
        best = max(vals)
        for r in rows:
            r[col].bold = r[col].value is not None and math.isclose(r[col].value, best,
                                                                    rel_tol=0, abs_tol=1e-9)


def _target_pcts(runs: Sequence[Run]) -> list[float]:
    return sorted({round(float(m["target_pct"]), 6) for r in runs for m in r.metrics})


def accuracy_table(runs: Sequence[Run], pcts: Sequence[float] | None = REPORT_PCTS,
                   metric: str = "accuracy") -> Table:
    """Accuracy (%) at each target labeled fraction, mean ± std over seeds, per setting
    (``metric = "auc"``: MedMNIST's AUC (%) instead, without the AULC column).

    Rows are methods (``n`` = runs of the method), columns the fractions in ``pcts``, then
    AULC (complete runs only). If the runs of a setting did not reach every one of ``pcts``
    (e.g. the 5-cycle quick preset against the papers' 15/25/35/45 %), or ``pcts`` is None,
    every cycle's target fraction becomes a column. The best mean of each column is bold. Std
    is the sample std (ddof = 1) over seeds.
    """
    sections = []
    aulc = metric == "accuracy"
    for setting, group in by_setting(runs).items():
        present = _target_pcts(group)
        cols = [p for p in (pcts or []) if any(math.isclose(p, q, abs_tol=1e-6) for q in present)]
        if len(cols) < len(pcts or ()) or not cols:
            cols = present
        note: list[str] = []
        rows = []
        for m in method_order(group):
            mruns = [r for r in group if r.method == m]
            row = [Cell(m), Cell(str(len(mruns)), float(len(mruns)), n=len(mruns))]
            for p in cols:
                vals = [a for a in (r.accuracy_at(p, metric) for r in mruns) if a is not None]
                row.append(_mean_std_cell(vals, len(mruns)))
            if aulc:  # AULC needs two points: a one-cycle run (FAST's single AL round) has none
                row.append(_mean_std_cell([r.aulc() for r in mruns
                                           if r.complete and len(r.metrics) > 1], len(mruns)))
            rows.append(row)
        for col in range(2, 2 + len(cols) + aulc):
            _bold_best(rows, col)
        incomplete = sum(not r.complete for r in group)
        if incomplete:
            note.append(f"{incomplete} incomplete run(s): counted where they reached a fraction"
                        + (", not in AULC." if aulc else "."))
        columns = ["method", "n", *[f"{p:g}%" for p in cols], *(["AULC"] if aulc else [])]
        sections.append(Section(setting, columns, rows, note))
    if not aulc:
        return Table("AUC (%) at labeled fraction, mean ± std over seeds", sections,
                     ["Bold (in plain text: a trailing *) = best mean in the column. AUC = "
                      "MedMNIST's: the positive class's ROC AUC (binary), else the mean "
                      "one-vs-rest ROC AUC over classes."])
    return Table("Accuracy (%) at labeled fraction, mean ± std over seeds", sections,
                 ["Bold (in plain text: a trailing *) = best mean in the column. AULC = area "
                  "under accuracy (%) vs labeled (%)."])


def aulc_by_seed(runs: Sequence[Run], method: str) -> dict[int, float]:
    """AULC per seed of the complete runs of ``method`` (runs of one setting)."""
    return {r.seed: r.aulc() for r in runs if r.method == method and r.complete}


def _pair_row(group: Sequence[Run], a: str, b: str) -> list[Cell]:
    res = stats.paired_comparison(aulc_by_seed(group, a), aulc_by_seed(group, b))
    winner = {"A": a, "B": b}.get(res["winner"], "tie")
    wtext = winner + (" (p<0.05)" if res["significant"] else "")

    def num(x: float, fmt: str) -> Cell:
        return Cell("–" if math.isnan(x) else format(x, fmt), x, n=res["n"])

    p = num(res["p"], ".4g")
    p.bold = res["p"] < stats.ALPHA
    return [Cell(a), Cell(b), Cell(wtext, n=res["n"]),
            Cell(str(res["n"]), float(res["n"]), n=res["n"]),
            num(res["mean_a"], ".2f"), num(res["mean_b"], ".2f"), num(res["mean_delta"], "+.2f"),
            num(res["pi_pos"], ".2f"), p, num(res["hl"], "+.2f")]


PAIRED_COLUMNS = ["A", "B", "winner", "n", "AULC A", "AULC B", "mean Δ", "π⁺", "p", "HL"]


def paired_table(runs: Sequence[Run], a: str | None = None, b: str | None = None) -> Table:
    """Paired AULC statistics over common seeds, Δ = AULC_A − AULC_B, per setting.

    With ``a`` and ``b``: that pair as given. With one of them: it against every other method.
    With neither: every pair once, oriented so that A is the winner (larger mean AULC), so π⁺, p
    and HL read as "how surely the winner beats the other". p is the one-sided exact Wilcoxon
    p-value for H1: A > B; bold when < 0.05. Only complete runs count.
    """
    if a is not None and a == b:
        raise FalkitError(f"comparing {a} with itself: name two different methods")
    fixed = a or b
    other = b if a else None
    sections = []
    for setting, group in by_setting(runs).items():
        done = [r for r in group if r.complete]
        methods = method_order(done)
        if fixed is not None:
            if fixed not in methods or (other is not None and other not in methods):
                continue
            pairs = [(fixed, other)] if other else [(fixed, m) for m in methods if m != fixed]
        else:
            pairs = []
            for x, y in combinations(methods, 2):
                res = stats.paired_comparison(aulc_by_seed(done, x), aulc_by_seed(done, y))
                pairs.append((y, x) if res["winner"] == "B" else (x, y))
        if pairs:
            sections.append(Section(setting, list(PAIRED_COLUMNS),
                                    [_pair_row(done, x, y) for x, y in pairs]))
    if fixed is not None and not sections:
        want = " and ".join(m for m in (fixed, other) if m)
        raise FalkitError(f"no setting has complete runs of {want} "
                          f"(methods: {', '.join(method_order(runs)) or 'none'})")
    title = "Paired comparison of AULC over seeds"
    if fixed is not None:
        title += f": {fixed} vs {other or 'every other method'}"
    notes = ["Δ = AULC_A − AULC_B per seed; π⁺ = fraction of seeds with Δ > 0; p = one-sided "
             "exact Wilcoxon signed-rank p-value (H1: Δ > 0; bold when < 0.05); HL = "
             "Hodges–Lehmann estimate of Δ; winner = larger mean AULC."]
    if not sections:
        notes.append("No setting has two methods with complete runs.")
    return Table(title, sections, notes)


def compare_text(runs: Sequence[Run], a: str, b: str) -> str:
    """`falkit compare A B`: per setting, AULC per seed and the paired statistics of A vs B."""
    paired_table(runs, a, b)  # raises FalkitError if no setting has both
    out = [f"{a} (A) vs {b} (B): AULC = area under accuracy (%) vs labeled (%)"]
    for setting, group in by_setting(runs).items():
        done = [r for r in group if r.complete]
        la, lb = aulc_by_seed(done, a), aulc_by_seed(done, b)
        if not la or not lb:
            continue
        res = stats.paired_comparison(la, lb)
        w = max(len(a), len(b), 9) + 5
        out += ["", setting, f"{'seed':>6}  {'AULC ' + a:>{w}}  {'AULC ' + b:>{w}}  {'Δ':>9}"]
        for s in sorted(set(la) | set(lb)):
            va = f"{la[s]:.2f}" if s in la else "–"
            vb = f"{lb[s]:.2f}" if s in lb else "–"
            d = f"{la[s] - lb[s]:+.2f}" if s in la and s in lb else "–"
            out.append(f"{s:>6}  {va:>{w}}  {vb:>{w}}  {d:>9}")
        skipped = sorted(r.seed for r in group if not r.complete and r.method in (a, b))
        if skipped:
            out.append(f"  (incomplete, not counted: seeds {', '.join(map(str, skipped))})")
        if res["n"] == 0:
            out.append("  no common seed")
            continue
        winner = {"A": a, "B": b}.get(res["winner"], "tie")
        sig = "significant" if res["significant"] else "not significant"
        out.append(f"  n = {res['n']} seeds   mean Δ = {res['mean_delta']:+.2f}   "
                   f"π⁺ = {res['pi_pos']:.2f}   p(A > B) = {res['p']:.4g}   "
                   f"p(B > A) = {res['p_rev']:.4g}   HL = {res['hl']:+.2f}")
        out.append(f"  winner: {winner} (larger mean AULC; {sig} at one-sided p < "
                   f"{stats.ALPHA:g})")
    return "\n".join(out)
