"""The per-level database: layers compressed offline at every level, stored compactly, reused by hash."""
from evoexp.database.apply import LevelApplier
from evoexp.database.build import build_database
from evoexp.database.store import Database, DatabaseSpec, decode_sparse, encode_sparse

__all__ = ["Database", "DatabaseSpec", "LevelApplier", "build_database", "encode_sparse", "decode_sparse"]
