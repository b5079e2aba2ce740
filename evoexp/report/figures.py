"""The EvoPress paper's figures for one run: search convergence and the per-block / per-layer level profiles.

Everything is drawn from what the run dir already holds (`result.json`, `history.jsonl`), so figures can be
redrawn for old runs (`evoexp-table --figures DIR`) without recomputing anything.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from evoexp.report.results import FinishedRun
from evoexp.utils import atomic_path, read_jsonl

log = logging.getLogger(__name__)
PROJECTION_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes; figures only go to files
    import matplotlib.pyplot as plt

    return plt


def read_history(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "history.jsonl"
    return read_jsonl(path) if path.exists() else []


def write_figures(run: FinishedRun) -> list[Path]:
    """Every figure that applies to this run, as PNG files in `<run dir>/figures`."""
    out = run.run_dir / "figures"
    paths = []
    history = read_history(run.run_dir)
    if history:
        paths.append(convergence(history, run, out / "convergence.png"))
    if run.kind == "drop" and run.recipe.compared:
        paths.append(depth_profile(run, out / "dropped_sub_blocks.png"))
    elif run.kind in ("sparse", "quant") and run.recipe.allocation:
        paths.append(level_profile(run, out / f"{'sparsity' if run.kind == 'sparse' else 'bits'}_profile.png"))
    elif run.kind == "structured" and run.recipe.allocation:
        paths.append(structured_profile(run, out / "kept_heads_neurons.png"))
    return paths


def _title(run: FinishedRun) -> str:
    target = run.target
    what = {"drop": "depth pruning", "sparse": "unstructured sparsity", "quant": "quantization",
            "structured": "structured pruning"}.get(run.kind, "")
    unit = f"{target:g} bits" if run.kind == "quant" else f"{target:.1%}" if target is not None else ""
    return f"{run.model}, {what} {unit}, seed {run.seed}"


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    _pyplot().close(fig)
    return path


def convergence(history: list[dict], run: FinishedRun, path: Path) -> Path:
    """Parent fitness per generation; held-out PPL where the search tracked it (search.track_every)."""
    plt = _pyplot()
    gens = [h["generation"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    kind = next((m.fitness_kind for m in run.recipe.models.values() if m.fitness_kind), "kl")
    ax.plot(gens, [h["parent_fitness"] for h in history], color="tab:blue", lw=1.5, label=f"parent fitness ({kind})")
    ax.set_xlabel("generation")
    ax.set_ylabel(f"fitness ({kind}, fresh minibatch each generation)", color="tab:blue")
    tracked = [h for h in history if h.get("heldout")]
    handles, labels = ax.get_legend_handles_labels()
    if tracked:
        ax2 = ax.twinx()
        for i, spec in enumerate(tracked[0]["heldout"]):
            ax2.plot([h["generation"] for h in tracked], [h["heldout"][spec] for h in tracked], "o--",
                     color=f"C{i + 1}", ms=3, label=f"held-out PPL {spec}")
        ax2.set_ylabel("held-out PPL")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.set_title(f"EvoPress convergence: {_title(run)}", fontsize=9)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def depth_profile(run: FinishedRun, path: Path) -> Path:
    """Which attention and MLP sub-blocks each model dropped (one pair of rows per model)."""
    plt = _pyplot()
    lines = {n: m.details["lines"] for n, m in run.recipe.models.items() if n != "dense" and "lines" in m.details}
    names = list(lines)
    blocks = len(lines[names[0]]) if names else 0
    grid = np.zeros((2 * len(names), blocks))
    for i, name in enumerate(names):
        for b, line in enumerate(lines[name]):
            grid[2 * i, b] = "attn" in line
            grid[2 * i + 1, b] = "mlp" in line
    fig, ax = plt.subplots(figsize=(max(6, blocks * 0.25), 0.5 * len(grid) + 1.2))
    ax.imshow(grid, cmap="Greys", vmin=0, vmax=1.4, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(grid)), [f"{n} {part}" for n in names for part in ("attn", "MLP")], fontsize=8)
    ax.set_xticks(range(blocks), [str(b) for b in range(blocks)], fontsize=7)
    ax.set_xticks(np.arange(-0.5, blocks), minor=True)
    ax.set_yticks(np.arange(-0.5, len(grid)), minor=True)
    ax.grid(which="minor", color="white", lw=1)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("block (dark: dropped)")
    ax.set_title(f"Dropped sub-blocks: {_title(run)}", fontsize=9)
    return _save(fig, path)


def _block_means(per_block: dict, numel: dict) -> tuple[list[int], list[float]]:
    blocks = sorted(per_block, key=int)
    means = []
    for b in blocks:
        vals = per_block[b]
        weights = [numel.get(p, 1) for p in vals]
        means.append(float(np.average(list(vals.values()), weights=weights)))
    return [int(b) for b in blocks], means


def level_profile(run: FinishedRun, path: Path) -> Path:
    """Per-block mean level of every model, the found model per projection type, and means per type."""
    plt = _pyplot()
    alloc = run.recipe.allocation
    numel = alloc.get("numel", {})
    scale, ylabel = (100.0, "sparsity (%)") if run.kind == "sparse" else (1.0, "bits per weight")
    models = {n: m.details["per_block"] for n, m in run.recipe.models.items() if "per_block" in m.details}
    models.setdefault(alloc["search"], alloc["per_block"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [3, 3, 2]})
    for name, pb in models.items():
        blocks, means = _block_means(pb, numel)
        axes[0].plot(blocks, np.array(means) * scale, "o-", ms=3, label=name)
    axes[0].set_title("numel-weighted mean per block", fontsize=9)
    found = alloc["per_block"]
    blocks = sorted(found, key=int)
    projections = [p for p in PROJECTION_ORDER if p in found[blocks[0]]] or list(found[blocks[0]])
    for p in projections:
        axes[1].plot([int(b) for b in blocks], [found[b][p] * scale for b in blocks], ".-", label=p)
    axes[1].set_title(f"{alloc['search']} per projection", fontsize=9)
    width = 0.8 / max(1, len(models))
    all_means = []
    for i, (name, pb) in enumerate(models.items()):
        means = [np.mean([pb[b][p] for b in pb]) * scale for p in projections]
        all_means += means
        axes[2].bar(np.arange(len(projections)) + i * width, means, width, label=name)
    lo, hi = min(all_means), max(all_means)
    pad = max((hi - lo) * 0.5, 1e-3 * max(abs(hi), 1.0))
    axes[2].set_ylim(lo - pad, hi + pad)  # the differences are the point, not the distance from zero
    axes[2].set_xticks(np.arange(len(projections)) + width * (len(models) - 1) / 2,
                       [p.replace("_proj", "") for p in projections], fontsize=8)
    axes[2].set_title("mean per projection type", fontsize=9)
    for ax in axes[:2]:
        ax.set_xlabel("block")
    for ax in axes:
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Level profile: {_title(run)}", fontsize=10)
    return _save(fig, path)


def structured_profile(run: FinishedRun, path: Path) -> Path:
    """Attention heads and MLP neurons each model keeps per block (the dense model's counts dashed)."""
    plt = _pyplot()
    models = {n: m.details["achieved"] for n, m in run.recipe.models.items() if "heads_kept" in
              m.details.get("achieved", {})}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, (kept, full, label) in zip(axes, (("heads_kept", "heads", "query heads kept"),
                                              ("neurons_kept", "neurons", "MLP neurons kept"))):
        for name, a in models.items():
            ax.plot(range(len(a[kept])), a[kept], "o-", ms=3, label=f"{name} ({sum(a[kept])})")
        if models:
            dense = next(iter(models.values()))[full]
            ax.plot(range(len(dense)), dense, "k--", lw=1, label=f"dense ({sum(dense)})")
        ax.set_xlabel("block")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Kept heads and neurons: {_title(run)}", fontsize=10)
    return _save(fig, path)

