"""Additive migrations of an existing store: columns added to the tables after stores existed.

Each entry of :data:`ADDED_COLUMNS` is a nullable column that :func:`add_missing_columns`
adds with ``ALTER TABLE ... ADD COLUMN`` when an older store lacks it (idempotent: a
store that has it is left alone). Old rows read it as NULL, and an older harness, which
does not map the column, keeps reading and writing the store, so the schema version
stays the same.
"""

from __future__ import annotations

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from harness.store.schema import Base

#: (table, column) pairs added after the first stores were written.
ADDED_COLUMNS: tuple[tuple[str, str], ...] = (("examples", "reference"), ("jobs", "flags"))


def add_missing_columns(conn: Connection) -> list[str]:
    """Add every column of :data:`ADDED_COLUMNS` that the store lacks; returns ``table.column`` of those added."""
    added = []
    insp = inspect(conn)
    for table, column in ADDED_COLUMNS:
        have = {c["name"] for c in insp.get_columns(table)}
        if column in have:
            continue
        col = Base.metadata.tables[table].c[column]
        # run in the caller's transaction (the store's write lock), so two processes opening
        # an old store at once do not both add the column
        conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {col.type.compile(dialect=conn.dialect)}"))
        added.append(f"{table}.{column}")
    return added
