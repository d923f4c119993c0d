"""Alembic environment: the target schema comes from the ORM models, the catalog URL from the config.

``upgrade_catalog`` sets ``sqlalchemy.url`` in the config it builds; by hand, pass ``-x url=...``.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from ciss_daemon.catalog.connection import WRITE_OPTIONS, make_engine
from ciss_daemon.catalog.tables import Base

config = context.config
# Only when run as `alembic -c migrations/alembic.ini`: inside the daemon, logging is the daemon's own.
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no catalog URL: pass -x url=sqlite:////path/to/catalog.sqlite")
    return url


def run_migrations_offline() -> None:
    """Write the SQL to stdout (``alembic upgrade head --sql``) instead of running it."""
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    # Foreign keys off: SQLite batch mode copies and drops tables that other tables refer to.
    engine = make_engine(_url(), foreign_keys=False)
    try:
        with engine.connect() as connection:
            connection.execution_options(**WRITE_OPTIONS)
            sqlite = connection.dialect.name == "sqlite"
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=sqlite,
                # make_engine emits BEGIN itself on SQLite, so DDL is transactional there too: a failed
                # upgrade leaves the catalog at its old revision instead of half-migrated.
                transactional_ddl=True,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
