"""Every config check of the per-layer recipe (method=sparse|quant), run before the model loads."""
from __future__ import annotations

from evoexp.config import DPSearchCfg, EvoPressCfg, OwlSearchCfg, RandomSearchCfg, RunCfg
from evoexp.errors import UserError
from evoexp.methods.export import FORMATS
from evoexp.methods.level_kinds import LEVEL_KINDS
from evoexp.solvers.registry import check_solver, solver_class

SEARCHES = ("uniform", "evopress", "random", "dp", "owl")
BASELINES = ("uniform", "random", "dp", "owl")
EXPORTS = ("none", "auto", *FORMATS)
REFERENCE_SCHEMAS = {"random": RandomSearchCfg, "dp": DPSearchCfg, "owl": OwlSearchCfg}


def check_layerwise(rc: RunCfg) -> None:
    m, s = rc.method, rc.search
    if s.kind not in SEARCHES:
        raise UserError(f"search: {s.kind!r} does not apply to method={m.kind} ({', '.join(SEARCHES)})")
    check_solver_settings(rc)
    bad = [r for r in (s.references or []) if r not in BASELINES]
    if bad:
        raise UserError(f"search.references: {bad[0]!r} is not a baseline of method={m.kind} "
                        f"({', '.join(BASELINES)})")
    kinds = [s.kind, *(s.references or [])]
    for name in (s.reference_settings or {}) if isinstance(s, EvoPressCfg) else ():
        reference_cfg(s, name)
    dp = [s] if s.kind == "dp" else [reference_cfg(s, "dp") or DPSearchCfg()] if "dp" in kinds else []
    if dp and dp[0].budget not in ("pooled", "groups"):
        key = "search.budget" if s.kind == "dp" else "search.reference_settings.dp.budget"
        raise UserError(f"{key}: expected pooled or groups, got {dp[0].budget!r}")
    if rc.export.kind not in EXPORTS:
        raise UserError(f"export: expected none, auto, hf, compressed_tensors or gptq, got {rc.export.kind!r}")
    kind = LEVEL_KINDS[m.kind]
    kind.check(m, kinds, rc.export.kind)
    if s.kind == "evopress":
        check_init(s.init, kind.fractional(m), m.target)


def check_solver_settings(rc: RunCfg) -> None:
    m = rc.method
    if rc.solver is None:
        raise UserError(f"solver: method={m.kind} needs a solver (solver=...)")
    check_solver(m.kind, rc.solver.kind)
    shard = rc.database.shard
    if shard is not None and (len(shard) != 2 or not 0 <= shard[0] < shard[1]):
        raise UserError(f"database.shard: expected [i, n] with 0 <= i < n, got {list(shard)}")
    solver = solver_class(rc.solver.kind)
    solver.check_config(rc.solver)
    if solver.propagation and rc.database.propagation not in ("auto", solver.propagation):
        raise UserError(f"database.propagation: solver={rc.solver.kind} fixes it to {solver.propagation}; "
                        f"use auto or {solver.propagation}, not {rc.database.propagation}")


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
