"""Alembic migrations of the control-plane store (``relay serve`` and ``relay db upgrade``)."""
