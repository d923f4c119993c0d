"""Migrations wired to the models: a fresh catalog upgraded to head matches them; unknown revisions are
refused untouched; older catalogs are backed up before an upgrade; connections get the SQLite pragmas."""

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

import migrations
from ciss_daemon.catalog import check_catalog, make_engine, upgrade_catalog
from ciss_daemon.db import SCHEMA_HEAD, Base
from ciss_daemon.exceptions import CatalogError, SchemaError

MIGRATIONS = Path(migrations.__file__).parent


def _config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url)
    return config


def _revision(path: Path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT version_num FROM alembic_version")]


def test_schema_head_constant_is_the_migrations_head() -> None:
    assert ScriptDirectory.from_config(_config("sqlite://")).get_current_head() == SCHEMA_HEAD


def test_fresh_catalog_upgraded_to_head_matches_the_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    assert upgrade_catalog(url, backup_dir=tmp_path / "backups") is None  # nothing to back up in a new file
    assert _revision(tmp_path / "catalog.sqlite") == [SCHEMA_HEAD]
    engine = make_engine(url)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
        tables = set(inspect(connection).get_table_names())
    engine.dispose()
    assert set(Base.metadata.tables) <= tables
    check_catalog(url)
    assert not (tmp_path / "backups").exists()


def test_upgrading_at_head_changes_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    upgrade_catalog(url, backup_dir=tmp_path / "backups")
    assert upgrade_catalog(url, backup_dir=tmp_path / "backups") is None
    assert not (tmp_path / "backups").exists()


def test_older_catalog_is_backed_up_before_the_upgrade(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    url = f"sqlite:///{path}"
    command.stamp(_config(url), "base")  # an existing catalog below head (there is one revision only)
    backup = upgrade_catalog(url, backup_dir=tmp_path / "backups")
    assert backup is not None and backup.parent == tmp_path / "backups"
    assert backup.name.startswith("catalog-base-") and backup.suffix == ".sqlite"
    with sqlite3.connect(backup) as db:  # the copy holds the catalog as it was: version table, no schema
        assert {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} == {
            "alembic_version"
        }
    assert _revision(path) == [SCHEMA_HEAD]


def test_catalog_of_a_newer_ciss_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    url = f"sqlite:///{path}"
    upgrade_catalog(url, backup_dir=None)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE alembic_version SET version_num = '9999_future'")
    db.close()
    before = path.read_bytes()
    message = (
        f"catalog at {path} has schema revision 9999_future, "
        f"newer than this ciss knows (head {SCHEMA_HEAD}); upgrade ciss"
    )
    with pytest.raises(SchemaError) as caught:
        upgrade_catalog(url, backup_dir=tmp_path / "backups")
    assert str(caught.value) == message
    with pytest.raises(SchemaError) as caught:
        check_catalog(url)
    assert str(caught.value) == message
    assert path.read_bytes() == before
    assert not (tmp_path / "backups").exists()


def test_check_catalog_reports_missing_and_unupgraded_catalogs(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    with pytest.raises(CatalogError) as caught:
        check_catalog(f"sqlite:///{path}")
    assert str(caught.value) == f"no catalog at {path}; run `ciss init` or start `ciss daemon` to create it"
    assert not path.exists()  # a reader never creates the file
    sqlite3.connect(path).close()
    with pytest.raises(SchemaError) as caught:
        check_catalog(f"sqlite:///{path}")
    assert str(caught.value) == f"catalog at {path} has no schema yet; start `ciss daemon` once to create it"


def test_upgrade_into_a_missing_folder_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "catalog.sqlite"
    with pytest.raises(CatalogError) as caught:
        upgrade_catalog(f"sqlite:///{path}", backup_dir=None)
    assert str(caught.value) == f"cannot create catalog at {path}: folder {path.parent} does not exist"


def test_bad_url_is_reported() -> None:
    with pytest.raises(CatalogError) as caught:
        make_engine("not a url")
    assert str(caught.value) == (
        "catalog url 'not a url' is not a database URL; fix [catalog] url in ciss.toml or leave it empty"
    )


def test_sqlite_connections_get_wal_foreign_keys_and_full_sync(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    upgrade_catalog(url, backup_dir=None)
    engine = make_engine(url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 5000
        with pytest.raises(IntegrityError):
            connection.execute(
                text(
                    'INSERT INTO steps (id, "index", batch_id, state, created_at, updated_at) '
                    "VALUES (1, 0, 42, 'accepted', '2026-01-01', '2026-01-01')"
                )
            )
    engine.dispose()


def test_downgrade_to_base_removes_the_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    upgrade_catalog(url, backup_dir=None)
    command.downgrade(_config(url), "base")
    engine = create_engine(url)
    with engine.connect() as connection:
        assert set(inspect(connection).get_table_names()) == {"alembic_version"}
    engine.dispose()


def test_alembic_command_line_takes_the_url_as_x_argument(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "alembic",
            "-c",
            str(MIGRATIONS / "alembic.ini"),
            "-x",
            f"url=sqlite:///{path}",
            "upgrade",
            "head",
        ],
        cwd=tmp_path,  # not the repository: the ini finds the migrations and the code on its own
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert _revision(path) == [SCHEMA_HEAD]
