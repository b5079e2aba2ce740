"""The package's shape, checked from the source alone (pure `ast`, nothing is imported).

Imports point downward through LAYERS, no module imports another module's private names, evoexp imports sit at
the top of the module unless they break an import cycle, and modules and functions stay small.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "evoexp"

LAYERS = [
    ("errors", "utils", "tensorfiles", "sharing"),  # foundations: no evoexp imports besides each other
    ("config",),                    # typed config schemas
    ("models",),                    # loading, the architecture adapter, the applier contract
    ("data",),                      # text sources, tokens, windows
    ("blockrun", "fitness"),        # running blocks, the teacher and minibatches
    ("solvers",),                   # layer-wise solvers and their registry
    ("train",),                     # training compressed models in place (masked AdamW, post-training)
    ("search",),                    # level spaces, candidate scoring, EvoPress
    ("eval",),                      # perplexity and zero-shot evaluation
    ("database",),                  # the per-level database: build, store, apply, provision
    ("methods",),                   # what each compression method does to a model
    ("recipes",),                   # one workflow per method kind, the recipe contract
    ("report", "tracking", "timings"),  # tables, figures, W&B, the run dir's step times and peaks
    ("run",),                       # one job: validate, load, run the recipe, write the run dir
    ("cli", "__main__"),            # the entrypoints
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}

# Function-level evoexp imports that break a real import cycle: (file, imported module) -> the cycle, e.g.
# ("evoexp/a.py", "evoexp.b"): "evoexp.b imports evoexp.a". Keep it empty if at all possible.
CYCLE_BREAKERS: dict[tuple[str, str], str] = {}

MAX_MODULE_LINES = 320
MAX_FUNCTION_LINES = 65
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _files(*dirs: str) -> list[Path]:
    # hidden dirs are virtualenvs and caches (bench/.venv-gptqmodel), not the project's code
    return sorted(p for d in dirs for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts
                  and not any(part.startswith(".") for part in p.relative_to(ROOT).parts))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    base = ROOT.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _layer(module: str) -> int | None:
    """`evoexp` itself (only the version) is foundations; `evoexp.x` and `evoexp.x.y` take the layer of `x`."""
    parts = module.split(".")
    return 0 if len(parts) == 1 else LAYER_OF.get(parts[1])


def _imports(path: Path):
    """(line, imported evoexp module, imported names, inside a function) for every evoexp import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "evoexp":
                        out.append((child.lineno, alias.name, [], in_function))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative import: resolve against the importing package
                    anchor = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                if base.split(".")[0] != "evoexp":
                    continue
                names = [a.name for a in child.names]
                for name in names:  # `from evoexp.x import y` where y is a submodule imports evoexp.x.y
                    target = f"{base}.{name}" if _is_module(f"{base}.{name}") else base
                    out.append((child.lineno, target, [name], in_function))
            visit(child, nested)

    visit(tree, False)
    return out


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_every_module_has_a_layer():
    unplaced = sorted({_rel(p) for p in _files("evoexp") if _layer(_module_name(p)) is None})
    if unplaced:
        pytest.fail("modules whose top-level name is in no layer (add it to LAYERS):\n" + "\n".join(unplaced),
                    pytrace=False)


def test_imports_point_downward():
    bad = []
    for path in _files("evoexp"):
        importer = _module_name(path)
        mine = _layer(importer)
        for line, target, _, _ in _imports(path):
            theirs = _layer(target)
            if mine is not None and (theirs is None or theirs > mine):
                bad.append(f"{_rel(path)}:{line} {importer} -> {target}")
    if bad:
        pytest.fail("imports of a higher layer (see LAYERS):\n" + "\n".join(dict.fromkeys(bad)), pytrace=False)


def test_no_private_names_across_modules():
    bad = []
    for path in _files("evoexp", "tests", "bench"):
        importer = _module_name(path)
        for line, target, names, _ in _imports(path):
            for name in names:
                private = name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
                if private and target != importer:
                    bad.append(f"{_rel(path)}:{line} {importer} imports {name} from {target}")
    if bad:
        pytest.fail("private names imported from another module (make them public):\n" + "\n".join(dict.fromkeys(bad)),
                    pytrace=False)


def test_evoexp_imports_at_module_top():
    bad = []
    for path in _files("evoexp"):
        for line, target, _, in_function in _imports(path):
            if in_function and (_rel(path), target) not in CYCLE_BREAKERS:
                bad.append(f"{_rel(path)}:{line} {_module_name(path)} -> {target}")
    if bad:
        pytest.fail(("function-level evoexp imports (move them to the top, or list the cycle they break in "
                     "CYCLE_BREAKERS):\n" + "\n".join(dict.fromkeys(bad))), pytrace=False)


def test_cycle_breakers_are_still_needed():
    present = {(_rel(p), target) for p in _files("evoexp") for _, target, _, inside in _imports(p) if inside}
    stale = sorted(f"{f} -> {t}" for f, t in set(CYCLE_BREAKERS) - present)
    if stale:
        pytest.fail("CYCLE_BREAKERS entries with no such import any more:\n" + "\n".join(stale), pytrace=False)


def test_sizes():
    """Modules stay under ~300 lines and functions under ~60 (slack for a docstring)."""
    bad = []
    for path in _files("evoexp"):
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            bad.append(f"{_rel(path)}: {lines} lines (module, max {MAX_MODULE_LINES})")

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                name = prefix + getattr(child, "name", "") if isinstance(child, DEFS) else prefix
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = child.end_lineno - child.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        bad.append(f"{_rel(path)}:{child.lineno} {name}: {n} lines (function, max "
                                   f"{MAX_FUNCTION_LINES})")
                    visit(child, name + ".")
                elif isinstance(child, ast.ClassDef):
                    visit(child, name + ".")
                else:
                    visit(child, prefix)

        visit(ast.parse(text, filename=str(path)), "")
    if bad:
        pytest.fail("too long:\n" + "\n".join(dict.fromkeys(bad)), pytrace=False)
