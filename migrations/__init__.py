"""Alembic environment and revisions: the only place the database schema is defined."""
