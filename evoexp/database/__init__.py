"""The per-level database: layers compressed offline at every level, stored compactly, reused by hash."""
from evoexp.database.apply import LevelApplier
from evoexp.database.build import SOLVERS_FOR, build_database, check_solver, make_solver
from evoexp.database.store import Database, DatabaseSpec, decode_sparse, encode_sparse

__all__ = ["Database", "DatabaseSpec", "LevelApplier", "build_database", "check_solver", "make_solver",
           "SOLVERS_FOR", "encode_sparse", "decode_sparse"]
