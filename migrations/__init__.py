"""Alembic migrations of the ciss catalog. ``ciss_daemon.catalog.connection.upgrade_catalog`` runs them."""
