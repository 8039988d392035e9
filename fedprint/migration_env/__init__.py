"""Alembic's environment (``env.py``, run by Alembic only, never imported) and the template of new
revision files, shared by every store's migrations (:mod:`fedprint.migrations`)."""
