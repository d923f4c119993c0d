"""Migrations wired to the models: a fresh catalog upgraded to head matches them; unknown revisions are
refused untouched; older catalogs are backed up before an upgrade; connections get the SQLite pragmas.
A fresh catalog, and populated ones from every earlier revision, are upgraded on SQLite and PostgreSQL."""

import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, create_engine, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

import migrations
from ciss_daemon.catalog.connection import check_catalog, make_engine, upgrade_catalog
from ciss_daemon.catalog.states import SCHEMA_HEAD
from ciss_daemon.catalog.tables import Base
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


def test_fresh_catalog_upgraded_to_head_matches_the_models(tmp_path: Path, new_catalog_url: str) -> None:
    url = new_catalog_url
    assert upgrade_catalog(url, backup_dir=tmp_path / "backups") is None  # nothing to back up in a new one
    assert _url_revision(url) == [SCHEMA_HEAD]
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


# --- upgrades of populated catalogs, interrupted upgrades (tests of the reliability suite) -----------------


def _revisions() -> list[str]:
    """Every revision in migrations/versions, oldest first."""
    script = ScriptDirectory.from_config(_config("sqlite://"))
    return [s.revision for s in reversed(list(script.walk_revisions()))]


def _seed_nothing(db: Connection) -> None:
    """At base the catalog holds no table of ours: "populated" is the version table alone."""


_AT = "2026-01-01 00:00:00.000000"


def _seed_0001(db: Connection) -> None:
    """A promoted step with its batch, class, job, model and events, a held step, a rejection (0001)."""
    rows = {
        "batches": [
            (1, "b0", "train", "a" * 64, _AT, "/s/b0", '{"1": "cat"}', '{"1": 1}', 2, 1),
            (2, "b1", "train", "b" * 64, _AT, "/s/b1", '{"1": "dog"}', '{"1": 2}', 2, 1),
        ],
        "steps": [(1, 0, 1, "promoted", "gate", _AT, _AT), (2, 1, 2, "held", "below the floor", _AT, _AT)],
        "classes": [(1, "cat", 1, 1, True, _AT), (2, "dog", 2, 2, False, _AT)],
        "jobs": [
            (1, 1, "done", 1, 3, None, "{}", _AT, _AT, _AT, _AT, None, "/j/1"),
            (2, 2, "done", 2, 3, None, None, _AT, _AT, _AT, _AT, None, "/j/2"),
        ],
        "model_versions": [
            (1, "v0001", 1, "/m/v0001", '{"model.json": "x"}', "{}", _AT, _AT, True, "promoted"),
            (2, "v0002", 2, "/m/v0002", '{"model.json": "y"}', "{}", _AT, None, False, "candidate"),
        ],
        "rejections": [(1, "bad", None, '["x: y — z"]', "/r/bad", _AT)],
        "events": [(1, _AT, "info", "promoted", "v0001 promoted", 1), (2, _AT, "warning", "held", "held", 2)],
    }
    for table, values in rows.items():
        marks = ", ".join(f":c{i}" for i in range(len(values[0])))
        db.execute(
            text(f'INSERT INTO "{table}" VALUES ({marks})'),
            [{f"c{i}": v for i, v in enumerate(row)} for row in values],
        )
    if db.dialect.name == "postgresql":  # explicit ids leave the id sequences behind: move them on
        for table in rows:
            db.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), 100)"))


# How to fill a catalog left at each revision before head with rows, in that revision's own schema (raw
# SQL: the ORM models follow head). A new migration must add a seeder for the revision it upgrades from.
SEEDERS: dict[str, Callable[[Connection], None]] = {
    "base": _seed_nothing,
    "0001": _seed_0001,
    "0002": _seed_0001,  # 0002 added an index only
}


def _populate(url: str, tag: str = "b") -> dict[str, int]:
    """Add a promoted step, an evaluation batch, a rejection and an event through the daemon's own
    functions (names and hashes made from ``tag``); returns the rows per table."""
    from ciss_daemon.catalog import connection
    from ciss_daemon.catalog import records as catalog

    engine = make_engine(url)
    factory = connection.session_factory(engine)
    with connection.transaction(factory) as s:
        batch = catalog.record_batch(
            session=s,
            name=f"{tag}0",
            kind="train",
            sha256=tag * 64,
            store_path=f"/s/{tag}0",
            class_names={1: f"{tag}-cat"},
            n_train=2,
            n_val=1,
        )
        step = catalog.create_step(session=s, batch=batch)
        job = catalog.create_job(session=s, step=step, max_attempts=3, jobs_dir=Path("/j"))
        catalog.start_job(session=s, job=job, pid=1)
        catalog.finish_job(session=s, job=job, state="done")
        catalog.set_step_state(session=s, step=step, state="evaluating")
        version = catalog.record_model_version(
            session=s, step=step, models_dir=Path("/m"), files={"model.json": "b" * 64}, metrics={}
        )
        catalog.promote_version(session=s, version=version)
        catalog.record_batch(
            session=s,
            name=f"{tag}-eval",
            kind="eval",
            sha256=tag.upper() * 64,
            store_path=f"/s/{tag}-eval",
            class_names={1: f"{tag}-cat"},
            n_train=1,
            n_val=0,
        )
        catalog.record_rejection(session=s, batch_name="bad", reasons=["x: y — z"], path="/r/bad")
        catalog.log_event(session=s, kind="promoted", message=f"{version.version} promoted", step=step)
    engine.dispose()
    return _counts(url)


def _counts(url: str) -> dict[str, int]:
    """Rows per table of the catalog at ``url`` (a SQLite backup's path works too)."""
    engine = create_engine(url if "://" in url else f"sqlite:///{url}", poolclass=NullPool)
    with engine.connect() as db:
        tables = inspect(db).get_table_names()
        counts = {t: db.execute(text(f'SELECT count(*) FROM "{t}"')).scalar_one() for t in tables}
    engine.dispose()
    return {t: n for t, n in counts.items() if t != "alembic_version"}


def _url_revision(url: str) -> list[str]:
    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as db:
        revisions = list(db.execute(text("SELECT version_num FROM alembic_version")).scalars())
    engine.dispose()
    return revisions


def _sound(url: str) -> None:
    """SQLite's own checks; PostgreSQL checks foreign keys on every write and has no integrity_check."""
    if not url.startswith("sqlite"):
        return
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    db.close()


def test_every_revision_before_head_has_a_seeder() -> None:
    revisions = _revisions()
    assert revisions[-1] == SCHEMA_HEAD
    files = {p.stem.split("_", 1)[0] for p in (MIGRATIONS / "versions").glob("[0-9]*.py")}
    assert files == set(revisions)  # the walk sees every file in migrations/versions
    assert set(SEEDERS) == {"base", *revisions[:-1]}


@pytest.mark.parametrize("start", ["base", *_revisions()[:-1]])
def test_a_populated_catalog_upgrades_from_every_earlier_revision(
    tmp_path: Path, start: str, new_catalog_url: str
) -> None:
    url = new_catalog_url
    command.upgrade(_config(url), start) if start != "base" else command.stamp(_config(url), "base")
    engine = create_engine(url, poolclass=NullPool)
    with engine.begin() as db:
        SEEDERS[start](db)
    engine.dispose()
    seeded = _counts(url)
    backup = upgrade_catalog(url, backup_dir=tmp_path / "backups")
    if url.startswith("sqlite"):
        assert backup is not None and _counts(str(backup)) == seeded  # the copy holds the catalog as it was
    else:
        assert backup is None  # a PostgreSQL server's backups are its administrator's (pg_dump)
    assert _url_revision(url) == [SCHEMA_HEAD]
    after = _counts(url)
    assert all(after[t] >= n for t, n in seeded.items())  # nothing seeded was lost
    engine = make_engine(url)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    engine.dispose()
    _sound(url)
    # The upgraded catalog takes the daemon's writes, and a later start leaves it alone.
    populated = _populate(url, tag="n")
    assert populated["steps"] == after["steps"] + 1
    assert populated["model_versions"] == after["model_versions"] + 1
    assert upgrade_catalog(url, backup_dir=tmp_path / "backups") is None
    assert _counts(url) == populated
    _sound(url)


_BROKEN = '''"""A migration that stops half way through (reliability tests only)."""

import os
import time

import sqlalchemy as sa
from alembic import op

revision = "9002"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("half_done", sa.Column("id", sa.Integer(), primary_key=True))
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("extra", sa.Text(), nullable=True))
    op.execute("UPDATE batches SET name = 'changed'")
    marker = os.environ.get("CISS_MIGRATION_MARKER")
    if marker:  # the test kills the process here
        open(marker, "w").close()
        time.sleep(120)
    raise RuntimeError("the migration stopped half way")


def downgrade() -> None:
    pass
'''


# Runs upgrade_catalog with the migrations in argv[1] and a head of 9002, in a process a test can kill.
_UPGRADE_WITH = """
import sys
from pathlib import Path
from alembic.config import Config
from ciss_daemon.catalog import connection

def config(url):
    c = Config()
    c.set_main_option("script_location", sys.argv[1])
    c.set_main_option("sqlalchemy.url", url)
    return c

connection._alembic_config = config
connection.SCHEMA_HEAD = "9002"
connection.upgrade_catalog(sys.argv[2], backup_dir=Path(sys.argv[3]))
"""


@pytest.fixture
def broken_migrations(tmp_path: Path) -> Path:
    """A copy of migrations/ with one more revision, after head, that fails half way."""
    import shutil

    copy = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "versions" / "9002_broken.py").write_text(_BROKEN.replace("{head}", SCHEMA_HEAD))
    return copy


def _use_migrations(monkeypatch: pytest.MonkeyPatch, copy: Path) -> None:
    from ciss_daemon.catalog import connection

    def config(url: str) -> Config:
        config = _config(url)
        config.set_main_option("script_location", str(copy))
        return config

    monkeypatch.setattr(connection, "_alembic_config", config)
    monkeypatch.setattr(connection, "SCHEMA_HEAD", "9002")


def _unchanged(path: Path, before: dict[str, int]) -> None:
    assert _revision(path) == [SCHEMA_HEAD]
    assert _counts(str(path)) == before  # no half_done table, every row still there
    with sqlite3.connect(path) as db:
        assert "extra" not in [r[1] for r in db.execute("PRAGMA table_info(batches)")]
        assert sorted(r[0] for r in db.execute("SELECT name FROM batches")) == ["b-eval", "b0"]
    db.close()
    _sound(f"sqlite:///{path}")


def test_a_migration_failing_midway_leaves_the_catalog_as_it_was(
    tmp_path: Path, broken_migrations: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "catalog.sqlite"
    url = f"sqlite:///{path}"
    upgrade_catalog(url, backup_dir=None)
    before = _populate(url)
    _use_migrations(monkeypatch, broken_migrations)
    with pytest.raises(CatalogError) as caught:
        upgrade_catalog(url, backup_dir=tmp_path / "backups")
    assert "the migration stopped half way" in str(caught.value)
    assert "left as it was" in str(caught.value)
    [backup] = (tmp_path / "backups").glob("*.sqlite")
    assert str(backup) in str(caught.value) and _counts(str(backup)) == before
    _unchanged(path, before)


def test_a_migration_killed_midway_leaves_the_catalog_as_it_was(
    tmp_path: Path, broken_migrations: Path
) -> None:
    import os
    import signal
    import time

    path = tmp_path / "catalog.sqlite"
    url = f"sqlite:///{path}"
    upgrade_catalog(url, backup_dir=None)
    before = _populate(url)
    marker = tmp_path / "halfway"
    process = subprocess.Popen(
        [sys.executable, "-c", _UPGRADE_WITH, str(broken_migrations), url, str(tmp_path / "backups")],
        env={**os.environ, "CISS_MIGRATION_MARKER": str(marker)},
    )
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline, "the migration never got half way"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)  # the power goes in the middle of the upgrade
    process.wait(30)
    [backup] = (tmp_path / "backups").glob("*.sqlite")
    assert _counts(str(backup)) == before
    _unchanged(path, before)
    # This ciss (without the broken revision) starts on it as if nothing had happened.
    assert upgrade_catalog(url, backup_dir=tmp_path / "backups") is None
    check_catalog(url)


def test_the_daemon_refuses_a_catalog_of_a_newer_ciss_in_one_line(tmp_path: Path) -> None:
    from ciss_daemon.workspace import init_workspace

    ws = init_workspace(tmp_path / "ws")
    upgrade_catalog(f"sqlite:///{ws.catalog_path}", backup_dir=None)
    with sqlite3.connect(ws.catalog_path) as db:
        db.execute("UPDATE alembic_version SET version_num = '9999_future'")
    db.close()
    before = ws.catalog_path.read_bytes()
    for args in (["daemon"], ["status"]):
        result = subprocess.run(
            [sys.executable, "-m", "ciss_daemon.cli", *args, "--workspace", str(ws.root)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "newer than this ciss knows" in lines[0], result.stderr
    assert ws.catalog_path.read_bytes() == before
