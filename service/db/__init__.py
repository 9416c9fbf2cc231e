"""Postgres access: pool, migrations and one module of SQL per table."""
