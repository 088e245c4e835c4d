"""The leaderboard: a read-only Streamlit page over the results store.

- :mod:`dashboard.queries`: SQL + pandas (no Streamlit): load, filter, aggregate, export.
- :mod:`dashboard.app`: the page (``streamlit run dashboard/app.py -- --db results.db``).
- :mod:`dashboard.cli`: the ``harness dashboard`` subcommand.
"""
