"""The gallery store's schema revisions (Alembic; see :mod:`fedprint.migrations`)."""
