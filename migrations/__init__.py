"""Alembic migrations of the ciss catalog. ``ciss_daemon.catalog.upgrade_catalog`` runs them."""
