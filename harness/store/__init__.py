"""Where a stored number lives: the results store, its tables, and the checks run on it.

- :mod:`harness.store.schema`: the SQLAlchemy tables (jobs, batches, examples, metrics, ...).
- :mod:`harness.store.store`: :class:`Store`, reading and writing jobs.
- :mod:`harness.store.codec`: canonical JSON for identities, image and array blobs.
- :mod:`harness.store.check`: ``harness check`` (stored results against an accuracy table).
- :mod:`harness.store.tables`: ``python -m harness.store.tables`` writes such a table.
- :mod:`harness.store.merge`: ``harness merge`` (stores from several machines into one, by job identity).
- :mod:`harness.store.paired`: the paired comparison of two stored jobs (``harness compare``, the dashboard).

A store is a SQLite file or a server database (PostgreSQL through psycopg 3: ``pip install -e '.[postgres]'``).
"""

from harness.store.codec import canonical, dumps
from harness.store.schema import SCHEMA_VERSION, Job
from harness.store.store import DEFAULT_DB, Store, resolve_url

__all__ = ["DEFAULT_DB", "SCHEMA_VERSION", "Job", "Store", "canonical", "dumps", "resolve_url"]
