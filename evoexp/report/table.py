"""`evoexp-table RUN_OR_SWEEP_DIRS...`: finished runs collected into the papers' table layout.

Rows are methods (dense first, the search itself last), columns are targets x metrics, cells are mean ± std
over seeds. A run that evaluated reference baselines (EvoPress runs do) contributes one row per model it
evaluated, so one sweep over targets and seeds fills the whole table. Output as Markdown, CSV and LaTeX.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field

from evoexp.errors import UserError
from evoexp.recipes.contract import ModelEval
from evoexp.report.figures import write_figures
from evoexp.report.results import FinishedRun, find_runs
from evoexp.utils import atomic_path

SHORT_SPEC = {"wikitext2:test": "Wiki2", "c4:validation": "C4", "fineweb_edu:eval": "FW", "c4_sample:eval": "C4s",
              "wiki_sample:eval": "Wikis", "tinystories:eval": "TS"}
LAST_ROWS = ("evopress", "darwinlm", "bonsai")  # the papers put their own method last
TRAINED = "_trained"  # a model after post-compression training (train=): listed right after its one-shot row


@dataclass(frozen=True)
class Metric:
    name: str  # column label
    higher_is_better: bool
    percent: bool = False


@dataclass
class Table:
    model: str
    method: str
    rows: list[str] = field(default_factory=list)
    targets: list = field(default_factory=list)
    metrics: list[Metric] = field(default_factory=list)
    cells: dict = field(default_factory=lambda: defaultdict(list))  # (row, target, metric name) -> [values]
    seeds: dict = field(default_factory=lambda: defaultdict(set))  # (row, target) -> seeds
    notes: set = field(default_factory=set)

    def target_label(self, t) -> str:
        return f"{t:g} bit" if self.method == "quant" else f"{t * 100:g}%"

    def stats(self, row, target, metric: Metric) -> tuple[float, float, int] | None:
        vals = self.cells.get((row, None if row == "dense" else target, metric.name))
        if not vals:
            return None
        n = len(vals)
        mean = sum(vals) / n
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
        return mean, std, n

    def best(self, target, metric: Metric):
        rows = [r for r in self.rows if r != "dense"]
        scored = [(s[0], r) for r in rows if (s := self.stats(r, target, metric))]
        if len(scored) < 2:
            return set()
        top = (max if metric.higher_is_better else min)(v for v, _ in scored)
        return {r for v, r in scored if v == top}


# --- collecting ----------------------------------------------------------------------------------------------------
def _values(entry: ModelEval, dtype: str | None, tasks: bool) -> list[tuple[Metric, float, str]]:
    out = []
    for spec, per_dtype in (entry.ppl or {}).items():
        dtypes = [d for d in per_dtype if d != "protocol"]
        d = dtype if dtype in dtypes else dtypes[0] if dtypes else None
        if d is None:
            continue
        proto = per_dtype["protocol"]
        note = f"{SHORT_SPEC.get(spec, spec)}: `{spec}` PPL, {proto['windows']} window(s) x {proto['seq_len']} tokens, {d}"
        out.append((Metric(f"{SHORT_SPEC.get(spec, spec)} PPL", False), per_dtype[d]["ppl"], note))
    zs = entry.zeroshot
    if zs:
        metrics = ", ".join(f"{t} {m}" for t, m in zs["report_metrics"].items())
        p = zs["protocol"]
        split = split_label(p)
        out.append((Metric("0-shot avg", True, True), zs["average"],
                    f"0-shot avg: mean of {metrics} (lm-eval {p.get('lm_eval')}, {split})"))
        if tasks:
            for t, m in zs["report_metrics"].items():
                out.append((Metric(f"{t} {m}", True, True), zs["tasks"][t][m], ""))
    return out


def split_label(proto: dict) -> str:
    """What part of each split a zero-shot protocol scored: "full splits", "limit 100" or "part 0 of 4"."""
    if proto.get("shard"):
        return "part {} of {}".format(*str(proto["shard"]).split("/"))
    return "full splits" if proto.get("limit") is None else f"limit {proto['limit']}"


def _cost(run: FinishedRun, name: str) -> list[tuple[Metric, float, str]]:
    """What making the model cost, on the rows of the model the run found: the steps that made it (teacher,
    calibration, database, search; the trained row adds the training), their wall time and peak memory."""
    if name not in (run.recipe.found, run.recipe.found + TRAINED) or not run.steps:
        return []
    note = ("method min: the steps that made the model (teacher targets, calibration, database, search; a trained "
            "row adds the training), summed over every process that worked on it, without loading, evaluations, "
            "export and reference baselines; peak GiB: the largest peak resident memory over those steps")
    trained = name.endswith(TRAINED)
    steps = [k for k in run.steps.seconds if _method_step(k) and (trained or k not in TRAINING_STEPS)]
    if not steps:
        return []
    peak = _peak(run, steps, trained)
    return [(Metric("method min", False), run.steps.total(steps) / 60, note)] + (
        [] if peak is None else [(Metric("peak GiB", False), peak / 1024, note)])


TRAINING_STEPS = ("train", "train_teacher")


def _method_step(key: str) -> bool:
    """A step that makes the model, not one that loads, evaluates, exports it or makes a reference baseline."""
    return key not in ("load_model", "report_fitness", "export") and not key.startswith(("eval_", "reference_"))


def _peak(run: FinishedRun, steps: list[str], trained: bool) -> float | None:
    """The largest peak of `steps`, None where one is not known. A run that kept no per-step peaks gives its
    overall peak to the trained row (its largest step is the training) and to a one-shot row only where it did
    not train; both include its evaluations."""
    if not run.steps.peaks:
        return run.peak_rss_mib if trained or not any(k in TRAINING_STEPS for k in run.steps.seconds) else None
    peaks = [run.steps.peaks.get(k) for k in steps]
    return None if any(p is None for p in peaks) else max(peaks)


def collect(runs: list[FinishedRun], by: list[str], dtype: str | None, tasks: bool, cost: bool = False
            ) -> list[Table]:
    tables: dict[tuple[str, str], Table] = {}
    for run in runs:
        key = (run.model, run.kind)
        table = tables.get(key)
        if table is None:
            table = tables[key] = Table(*key)
        target = run.target
        if target is not None and target not in table.targets:
            table.targets.append(target)
        suffix = ", ".join(f"{k}={run.setting(k)}" for k in by)
        seed = run.seed
        for name, entry in run.recipe.models.items():
            row = name if name == "dense" or not suffix else f"{name} ({suffix})"
            if row not in table.rows:
                table.rows.append(row)
            t = None if row == "dense" else target
            for metric, value, note in _values(entry, dtype, tasks) + (_cost(run, name) if cost else []):
                if metric not in table.metrics:
                    table.metrics.append(metric)
                if seed in table.seeds[(row, t)]:
                    continue  # every run re-reports dense (and shared references): one value per seed
                table.cells[(row, t, metric.name)].append(value)
                if note:
                    table.notes.add(note)
            table.seeds[(row, t)].add(seed)
    for table in tables.values():
        table.targets.sort()
        table.rows = sorted(table.rows, key=lambda r: row_order(r, table.rows))
        if not table.targets:  # dense-only results: one column block without a target
            table.targets = [None]
    return sorted(tables.values(), key=lambda t: (t.model, t.method))


def row_order(row: str, rows: list[str]) -> tuple:
    """dense first, the papers' own methods last (in LAST_ROWS order), each trained model after its one-shot one,
    otherwise in the order found."""
    name, _, suffix = row.partition(" (")
    base = name.removesuffix(TRAINED)
    one_shot = base + (f" ({suffix}" if suffix else "")
    first = rows.index(one_shot) if one_shot in rows else rows.index(row)
    rank = 0 if name == "dense" else 2 + LAST_ROWS.index(base) if base in LAST_ROWS else 1
    return rank, first, name != base


# --- rendering -------------------------------------------------------------------------------------------------------
def fmt(stats, metric: Metric) -> str:
    if stats is None:
        return "–"
    mean, std, n = stats
    scale = 100.0 if metric.percent else 1.0
    digits = 1 if metric.percent or mean * scale >= 1000 else 2
    s = f"{mean * scale:.{digits}f}"
    return f"{s} ± {std * scale:.{digits}f}" if n > 1 else s


def columns(table: Table) -> list[tuple]:
    return [(t, m) for t in table.targets for m in table.metrics]


def title(table: Table) -> str:
    what = {"drop": "depth pruning", "sparse": "unstructured sparsity", "quant": "quantization",
            "structured": "structured pruning", "dense": "dense"}.get(table.method, table.method)
    return f"{table.model} — {what}"


def seeds_note(table: Table) -> str:
    counts = sorted({len(s) for (row, _), s in table.seeds.items()})
    return f"mean ± sample std over {'/'.join(map(str, counts))} seed(s)" if counts else ""


def markdown(tables: list[Table]) -> str:
    out = []
    for table in tables:
        cols = columns(table)
        head = ["method"] + [f"{table.target_label(t)} {m.name}" if t is not None else m.name for t, m in cols]
        lines = [f"### {title(table)}", "", "| " + " | ".join(head) + " |",
                 "|" + "---|" * len(head)]
        for row in table.rows:
            cells = [row]
            for t, m in cols:
                s = fmt(table.stats(row, t, m), m)
                cells.append(f"**{s}**" if row in table.best(t, m) else s)
            lines.append("| " + " | ".join(cells) + " |")
        notes = sorted(table.notes) + [seeds_note(table) + "; bold: best non-dense row"]
        lines += [""] + [f"- {n}" for n in notes] + [""]
        out.append("\n".join(lines))
    return "\n".join(out)


def to_csv(tables: list[Table]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "method", "row", "target", "metric", "mean", "std", "n"])
    for table in tables:
        for row in table.rows:
            for t, m in columns(table):
                s = table.stats(row, t, m)
                if s is not None:
                    w.writerow([table.model, table.method, row, "" if t is None else t, m.name,
                                repr(s[0]), repr(s[1]), s[2]])
    return buf.getvalue()


def _tex(s: str) -> str:
    return s.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def latex(tables: list[Table]) -> str:
    out = []
    for table in tables:
        cols = columns(table)
        k = len(table.metrics)
        lines = [f"% {title(table)}; {seeds_note(table)}", r"\begin{tabular}{l" + ("|" + "c" * k) * len(table.targets)
                 + "}", r"\toprule"]
        if table.targets != [None]:
            lines.append("method & " + " & ".join(rf"\multicolumn{{{k}}}{{c}}{{{_tex(table.target_label(t))}}}"
                                                  for t in table.targets) + r" \\")
        lines.append(" & " + " & ".join(_tex(m.name) for _, m in cols) + r" \\")
        lines.append(r"\midrule")
        for row in table.rows:
            cells = []
            for t, m in cols:
                s = _tex(fmt(table.stats(row, t, m), m)).replace("±", r"$\pm$").replace("–", "--")
                cells.append(rf"\textbf{{{s}}}" if row in table.best(t, m) else s)
            lines.append(_tex(row) + " & " + " & ".join(cells) + r" \\")
            if row == "dense":
                lines.append(r"\midrule")
        lines += [r"\bottomrule", r"\end{tabular}", ""]
        out.append("\n".join(lines))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="evoexp-table", description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", help="run dirs, sweep dirs or result.json files (searched recursively)")
    ap.add_argument("--format", choices=["md", "csv", "latex"], default="md", help="what to print (default md)")
    ap.add_argument("--out", help="also write OUT.md, OUT.csv and OUT.tex")
    ap.add_argument("--by", action="append", default=[], metavar="KEY",
                    help="split rows by a config key, e.g. --by fitness.kind (repeatable)")
    ap.add_argument("--dtype", help="which evaluated dtype feeds the PPL cells (default: the first one)")
    ap.add_argument("--tasks", action="store_true", help="one column per zero-shot task besides the average")
    ap.add_argument("--cost", action="store_true",
                    help="the wall time (min) and peak memory (GiB) of the run that found each model")
    ap.add_argument("--figures", action="store_true", help="(re)draw every run's figures into its run dir")
    args = ap.parse_args(argv)
    try:
        runs, unfinished = find_runs(args.paths)
        if not runs:
            raise UserError(f"no finished result.json under {' '.join(args.paths)}"
                            + (f" ({unfinished} unfinished run(s))" if unfinished else ""))
        tables = collect(runs, args.by, args.dtype, args.tasks, args.cost)
    except UserError as ex:
        print(f"evoexp-table: error: {ex}", file=sys.stderr)
        return 2
    rendered = {"md": markdown(tables), "csv": to_csv(tables), "latex": latex(tables)}
    print(rendered[args.format])
    if unfinished:
        print(f"({unfinished} unfinished run(s) left out)", file=sys.stderr)
    if args.out:
        for ext, key in (("md", "md"), ("csv", "csv"), ("tex", "latex")):
            with atomic_path(f"{args.out}.{ext}") as tmp:
                tmp.write_text(rendered[key])
        print(f"wrote {args.out}.md, {args.out}.csv, {args.out}.tex", file=sys.stderr)
    if args.figures:
        for run in runs:
            for p in write_figures(run):
                print(f"figure: {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
