"""Level grids for per-layer sparsity and bit-widths, and what a database built for them propagates."""
from __future__ import annotations

import math

from evoexp.errors import UserError
from evoexp.models.adapter import DecoderAdapter, LinearInfo

MAX_BITS = 8


def units(adapter: DecoderAdapter) -> list[LinearInfo]:
    """The compressible layers: every linear of every block (embeddings and the head stay dense)."""
    return adapter.linears()


def check_sparse(method, layers: list[LinearInfo]) -> None:
    if not 0.0 <= method.target < 1.0:
        raise UserError(f"method.target: a sparsity in [0, 1) is expected, got {method.target}")
    if method.nm is None:
        return
    if len(method.nm) != 2 or not 0 < method.nm[0] < method.nm[1]:
        raise UserError(f"method.nm: expected [n, m] with 0 < n < m, got {list(method.nm)}")
    n, m = method.nm
    if not math.isclose(method.target, n / m):
        raise UserError(f"method.nm: {n}:{m} prunes exactly {n / m:g} of the weights, but method.target is "
                        f"{method.target} (set method.target={n / m:g})")
    bad = [li for li in layers if li.in_features % m]
    if bad:
        raise UserError(f"method.nm: {bad[0].name} has {bad[0].in_features} inputs, not a multiple of m={m}")


def check_quant(method) -> None:
    bad = [b for b in method.levels if not (isinstance(b, int) and 1 <= b <= MAX_BITS)]
    if bad or not method.levels:
        raise UserError(f"method.levels: bit-widths between 1 and {MAX_BITS} expected, got {list(method.levels)}")


def uniform_grid(method, layers: list[LinearInfo]) -> dict[str, list]:
    """One level per layer, the target: the standard one-shot pipelines."""
    if method.kind == "sparse":
        check_sparse(method, layers)
        return {li.name: [float(method.target)] for li in layers}
    check_quant(method)
    if float(method.target) != int(method.target) or not 1 <= method.target <= MAX_BITS:
        raise UserError(f"method.target: search=uniform needs a whole bit-width between 1 and {MAX_BITS}, got "
                        f"{method.target} (fractional targets need a search over bit-widths)")
    return {li.name: [int(method.target)] for li in layers}


def resolve_propagation(propagation: str, kind: str, grid: dict[str, list], target,
                        reference_level) -> tuple[str, dict[str, int]]:
    """(propagation, {layer: index of the level the next block's inputs are computed with})."""
    if propagation == "auto":
        if all(len(levels) == 1 for levels in grid.values()):
            propagation = "compressed"
        else:
            propagation = "dense" if kind == "sparse" else "reference"
    if propagation == "dense":
        return propagation, {}
    if propagation not in ("compressed", "reference"):
        raise UserError(f"database.propagation: expected auto, dense, compressed or reference, got {propagation!r}")
    value, key = (target, "method.target") if propagation == "compressed" else (reference_level,
                                                                                 "database.reference_level")
    reference = {}
    for name, levels in grid.items():
        close = [i for i, v in enumerate(levels) if math.isclose(float(v), float(value), abs_tol=1e-9)]
        if not close:
            raise UserError(f"{key}: {value} is not a level of {name} (levels {levels}); propagation="
                            f"{propagation} needs it in the grid")
        reference[name] = close[0]
    return propagation, reference
