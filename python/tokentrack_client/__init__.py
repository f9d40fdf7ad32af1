"""tokentrack: PostgreSQL-native exact LLM token accounting.

The SQL under ``sql/`` is the product; this package is the thin asyncpg client,
the migrator (:mod:`tokentrack_client.migrate`) and the ``tokentrack`` CLI.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
