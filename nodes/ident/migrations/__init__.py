"""The IDENT record model's schema revisions (Alembic; see :mod:`fedprint.migrations`)."""
