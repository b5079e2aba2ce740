"""Every config check of the per-layer recipes (method=sparse|quant|structured), run before the model loads."""
from __future__ import annotations

from evoexp.config import DPSearchCfg, EvoPressCfg, OwlSearchCfg, RandomSearchCfg, RunCfg
from evoexp.errors import UserError, check_above, check_choice, check_min, check_positive, fail
from evoexp.methods.export import FORMATS
from evoexp.methods.layerwise import check_quant, check_sparse, uniform_grid
from evoexp.methods.level_kinds import LEVEL_KINDS
from evoexp.models.peek import peek_context
from evoexp.recipes.checks import check_calibration, check_context, check_search, check_writable_dir, evopress_tokens
from evoexp.solvers.registry import check_solver, solver_class

SEARCHES = ("uniform", "evopress", "darwinlm", "bonsai", "random", "dp", "owl")
BASELINES = ("uniform", "random", "dp", "owl")
EXPORTS = ("none", "auto", *FORMATS)
REFERENCE_SCHEMAS = {"random": RandomSearchCfg, "dp": DPSearchCfg, "owl": OwlSearchCfg}
PROPAGATIONS = ("auto", "dense", "compressed", "reference")
GROUP_RULES = ("size", "name", "none")


def check_layerwise(rc: RunCfg) -> None:
    m, s = rc.method, rc.search
    if s.kind not in SEARCHES:
        raise UserError(f"search: {s.kind!r} does not apply to method={m.kind} ({', '.join(SEARCHES)})")
    if s.kind == "darwinlm" and m.kind != "structured":
        raise UserError(f"search: darwinlm fine-tunes candidates whose heads and neurons are removed; it needs "
                        f"method=structured, not method={m.kind}")
    if s.kind == "bonsai":  # method=structured takes its own checks (recipes/bonsai.py)
        raise UserError(f"search: bonsai removes heads and neurons; it needs method=structured, not "
                        f"method={m.kind}")
    check_solver_settings(rc)
    bad = [r for r in (s.references or []) if r not in BASELINES]
    if bad:
        raise UserError(f"search.references: {bad[0]!r} is not a baseline of method={m.kind} "
                        f"({', '.join(BASELINES)})")
    kinds = [s.kind, *(s.references or [])]
    check_search(s)
    for name in (s.reference_settings or {}) if isinstance(s, EvoPressCfg) else ():
        check_search(reference_cfg(s, name), f"search.reference_settings.{name}")
    dp = [s] if s.kind == "dp" else [reference_cfg(s, "dp") or DPSearchCfg()] if "dp" in kinds else []
    if dp and dp[0].budget not in ("pooled", "groups"):
        key = "search.budget" if s.kind == "dp" else "search.reference_settings.dp.budget"
        raise UserError(f"{key}: expected pooled or groups, got {dp[0].budget!r}")
    if rc.export.kind not in EXPORTS:
        raise UserError(f"export: expected none, auto, hf, compressed_tensors or gptq, got {rc.export.kind!r}")
    kind = LEVEL_KINDS[m.kind]
    kind.check(m, kinds, rc.export.kind)
    check_levels(rc, searched(rc))
    solver = solver_class(rc.solver.kind, m.kind)
    if not solver.propagation:
        check_propagation(rc, solver.needs_data)
    if s.kind in ("evopress", "darwinlm"):
        check_init(s.init, kind.fractional(m), m.target)
        check_calibration(rc, evopress_tokens(s))
    if s.kind == "darwinlm":
        check_darwinlm(rc)


def check_darwinlm(rc: RunCfg) -> None:
    """The training side of search=darwinlm: learning rate, token budgets against the training text."""
    s = rc.search
    check_above(s.lr, "search.lr", 0)
    check_min(s.weight_decay, "search.weight_decay", 0)
    check_positive(s.train_batch, "search.train_batch")
    check_positive(s.train_windows, "search.train_windows")
    text = s.train_windows * rc.data.seq_len
    for i, st in enumerate(s.stages):
        check_positive(st.train_tokens, f"search.stages[{i}].train_tokens")
        if st.train_tokens > text:
            raise UserError(f"search.stages[{i}].train_tokens: {st.train_tokens} exceeds the training text, "
                            f"search.train_windows x data.seq_len = {s.train_windows} x {rc.data.seq_len} = {text} "
                            f"tokens (raise search.train_windows)")


def searched(rc: RunCfg) -> bool:
    """Whether the run needs a level space (a grid of several levels per layer): any search but a lone uniform."""
    s = rc.search
    refs = s.references if s.references is not None else [] if s.kind == "uniform" else ["uniform"]
    return s.kind != "uniform" or any(r != "uniform" for r in refs)


def check_levels(rc: RunCfg, search: bool) -> None:
    """method.target / nm / step / num_levels / levels / group_rule, as the run's level grid will use them."""
    m = rc.method
    if m.kind == "structured":  # its target and steps: StructuredKind.check and the structured recipe's validate
        return
    if m.kind == "sparse":
        check_sparse(m, [])  # target in [0, 1), nm well formed (its divisibility needs the model)
        check_positive(m.step, "method.step", null=True)
        check_positive(m.num_levels, "method.num_levels")
        return
    check_quant(m)
    check_choice(m.group_rule, "method.group_rule", GROUP_RULES)
    if not search:  # the standard one-shot pipeline: one whole bit-width everywhere
        uniform_grid(m, [])
        return
    bits = sorted(m.levels)
    if bits != list(range(bits[0], bits[-1] + 1)):
        raise UserError(f"method.levels: consecutive bit-widths are expected (a level switch moves one bit), "
                        f"got {list(m.levels)}")
    if not bits[0] <= m.target <= bits[-1]:
        fail("method.target", f"a mean bit-width within method.levels ({bits[0]} to {bits[-1]})", m.target)


def check_solver_settings(rc: RunCfg) -> None:
    m = rc.method
    if rc.solver is None:
        raise UserError(f"solver: method={m.kind} needs a solver (solver=...)")
    check_solver(m.kind, rc.solver.kind)
    check_database(rc)
    solver = solver_class(rc.solver.kind, m.kind)
    solver.check_config(rc.solver)
    if solver.propagation and rc.database.propagation not in ("auto", solver.propagation):
        raise UserError(f"database.propagation: solver={rc.solver.kind} fixes it to {solver.propagation}; "
                        f"use auto or {solver.propagation}, not {rc.database.propagation}")


def check_database(rc: RunCfg) -> None:
    db = rc.database
    shard = db.shard
    if shard is not None and (len(shard) != 2 or not 0 <= shard[0] < shard[1]):
        raise UserError(f"database.shard: expected [i, n] with 0 <= i < n, got {list(shard)}")
    check_positive(db.windows, "database.windows")
    check_min(db.seq_len, "database.seq_len", 2)
    context = peek_context(rc.model)
    if context is not None:
        check_context(db.seq_len, "database.seq_len", context)
    check_positive(db.batch, "database.batch")
    check_min(db.cache_gb, "database.cache_gb", 0)
    check_choice(db.propagation, "database.propagation", PROPAGATIONS)
    check_writable_dir(db.dir, "database.dir")


def check_propagation(rc: RunCfg, needs_data: bool) -> None:
    """What the database's propagation resolves to must be possible with the run's level grid (as
    `database.provision.resolve_propagation` and `solvers.capture.sequential` will require)."""
    db, m = rc.database, rc.method
    multi = searched(rc)
    propagation = db.propagation
    if propagation == "auto":
        propagation = "compressed" if not multi else "reference" if m.kind == "quant" else "dense"
    if propagation == "dense" and db.true_sequential and needs_data:
        raise UserError("database.true_sequential: needs propagation compressed or reference (dense never "
                        "replaces weights, so there is no sequence inside a block)")
    if m.kind != "quant" or propagation == "dense" or not m.levels:  # sparse grids are known once the model is
        return
    levels = sorted(m.levels) if multi else [m.target]
    value, key = (m.target, "method.target") if propagation == "compressed" else (db.reference_level,
                                                                                 "database.reference_level")
    if not any(abs(float(v) - float(value)) <= 1e-4 for v in levels):
        fail(key, f"one of the levels {levels} (propagation={propagation} computes the next block's inputs with "
                  f"it)", value)


def check_init(init: str | None, fractional: bool, target: float) -> None:
    if init == "fractional" and not fractional:
        raise UserError("search.init: fractional applies to fractional bit targets only")
    if fractional and init not in (None, "fractional"):
        raise UserError(f"search.init: a fractional bit target needs init=fractional (or null), not {init}")


def reference_cfg(search, name: str):
    """A reference baseline's settings: its defaults, updated from search.reference_settings[name] (or None)."""
    # only EvoPress runs have reference_settings: the baselines' own configs have no references of their own
    given = dict(search.reference_settings or {}).get(name) if isinstance(search, EvoPressCfg) else None
    if not given:
        return None
    schema = REFERENCE_SCHEMAS.get(name)
    fields = set(schema.__dataclass_fields__) - {"kind", "references"} if schema else set()
    bad = sorted(set(given) - fields)
    if schema is None or bad:
        raise UserError(f"search.reference_settings.{name}: unknown key(s) {bad or sorted(given)} (expected "
                        f"{sorted(fields) if fields else 'a baseline with settings: random, dp or owl'})")
    return schema(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in given.items()})
