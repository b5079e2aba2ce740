"""The closing summary a job prints: the found configuration and its figures next to dense and the references."""
from __future__ import annotations

from evoexp.report.results import FinishedRun
from evoexp.report.table import split_label


def print_summary(run: FinishedRun) -> None:
    params = f"{run.parameters / 1e6:.1f}M params" if run.parameters else "? params"
    print(f"\n{run.name}  ({run.model}, {params})  ->  {run.run_dir}")
    if run.recipe.compared:
        print_models(run)
        print_files(run)
        return
    found = run.recipe.found_model
    for spec, entry in (found.ppl or {}).items():
        proto = entry["protocol"]
        cells = "  ".join(f"{dtype} {fig['ppl']:.4f}{' (cached)' if fig.get('cached') else ''}"
                          for dtype, fig in entry.items() if dtype != "protocol")
        print(f"  {spec} PPL: {cells}   [{proto['windows']} windows x {proto['seq_len']} tokens, "
              f"{'BOS' if proto['bos'] else 'no BOS'}]")
    if found.zeroshot:
        print_zeroshot(found.zeroshot)


def print_zeroshot(zs: dict, label: str = "") -> None:
    p = zs["protocol"]
    cells = " | ".join(f"{task} {metric} {zs['tasks'][task][metric]:.4f}"
                       f"{' (cached)' if zs['tasks'][task].get('cached') else ''}"
                       for task, metric in zs["report_metrics"].items())
    print(f"  zero-shot{label}: {cells} | average {zs['average']:.4f}   [lm-eval {p['lm_eval']}, "
          f"{p['num_fewshot']}-shot, {split_label(p)}, batch {p['batch_size']}, {p['dtype']}]")


def print_models(run: FinishedRun) -> None:
    """The found configuration next to dense and the reference baselines."""
    alloc, models = run.recipe.allocation or {}, run.recipe.models
    print(f"  found by {alloc.get('search', run.recipe.found)}: {alloc.get('summary', '')}")
    kind = next((m.fitness_kind for m in models.values() if m.fitness_kind), None)
    first = next(iter(models.values()))
    heads = [f"{spec} PPL ({d})" for spec, ppl in (first.ppl or {}).items() for d in ppl if d != "protocol"]
    zeroshot = any(m.zeroshot for m in models.values())
    if zeroshot:
        heads.append("0-shot avg")
    print(f"  {'model':<16}" + (f"  {kind + ' fitness':>10}" if kind else "") + "  " + "  ".join(heads))
    for name, m in models.items():
        cells = [f"{name:<16}"]
        if kind:
            cells.append(f"{m.fitness:>10.5f}" if m.fitness is not None else f"{'-':>10}")
        for ppl in (m.ppl or {}).values():
            cells += [f"{fig['ppl']:>12.3f}" for d, fig in ppl.items() if d != "protocol"]
        if zeroshot:
            cells.append(f"{m.zeroshot['average']:>10.4f}" if m.zeroshot else f"{'-':>10}")
        print("  " + "  ".join(cells))
    for name, m in models.items():
        if m.zeroshot:
            print_zeroshot(m.zeroshot, f" {name}")


def print_files(run: FinishedRun) -> None:
    """Where the run's figures and exported model are."""
    figures = sorted((run.run_dir / "figures").glob("*.png"))
    if figures:
        print(f"  figures: {', '.join(str(p) for p in figures)}")
    config = run.run_dir / "model" / "config.json"
    if config.exists():  # a shrunk structured model ships its own modeling code (auto_map): remote code
        remote = '"auto_map"' in config.read_text()
        loader = "from_pretrained(dir, trust_remote_code=True)" if remote else "from_pretrained"
        print(f"  model: {run.run_dir / 'model'} (AutoModelForCausalLM.{loader} loads it)")
