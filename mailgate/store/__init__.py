"""Persistence: tables, engine and sessions, migrations, and the blob store for raw mail."""
