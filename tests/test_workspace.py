"""Workspace creation and discovery: explicit path, $CISS_WORKSPACE, current folder, and the errors."""

from pathlib import Path

import pytest

from ciss_daemon.exceptions import SettingsError, WorkspaceError
from ciss_daemon.settings import Settings, default_settings_toml, load_settings, parse_settings
from ciss_daemon.workspace import Workspace, find_workspace, init_workspace


def test_init_creates_every_folder_and_the_default_settings(tmp_path: Path) -> None:
    workspace = init_workspace(tmp_path / "ws")
    assert workspace.root == (tmp_path / "ws").resolve()
    for folder in (
        workspace.inbox,
        workspace.staging,
        workspace.store,
        workspace.models,
        workspace.jobs,
        workspace.rejected,
        workspace.archive,
        workspace.backups,
    ):
        assert folder.is_dir(), folder
    assert workspace.staging.parent == workspace.inbox
    assert workspace.settings_path.read_text(encoding="utf-8") == default_settings_toml()
    assert load_settings(workspace.settings_path) == Settings()
    assert not workspace.catalog_path.exists()  # the catalog is created by upgrade_catalog


def test_init_writes_given_settings(tmp_path: Path) -> None:
    text = "[train]\nbatch_size = 2\n"
    workspace = init_workspace(tmp_path, settings_text=text)
    assert load_settings(workspace.settings_path).engine.train.batch_size == 2


def test_init_with_bad_settings_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(SettingsError):
        init_workspace(tmp_path / "ws", settings_text="[train]\nbatch_size = 0\n")
    assert not (tmp_path / "ws").exists()


def test_init_refuses_an_existing_workspace_and_keeps_its_settings(tmp_path: Path) -> None:
    init_workspace(tmp_path, settings_text="[train]\nbatch_size = 2\n")
    with pytest.raises(WorkspaceError) as caught:
        init_workspace(tmp_path)
    assert str(caught.value) == (
        f"{tmp_path.resolve()} is already a workspace (ciss.toml exists); "
        "edit that file or choose another folder"
    )
    assert (tmp_path / "ciss.toml").read_text(encoding="utf-8") == "[train]\nbatch_size = 2\n"


def test_init_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(WorkspaceError) as caught:
        init_workspace(tmp_path / "f")
    assert (
        str(caught.value)
        == f"cannot create a workspace at {(tmp_path / 'f').resolve()}: it is a file; choose a folder"
    )


def test_find_explicit_env_and_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = init_workspace(tmp_path / "first")
    second = init_workspace(tmp_path / "second")
    monkeypatch.delenv("CISS_WORKSPACE", raising=False)
    monkeypatch.chdir(first.root)
    assert find_workspace() == first
    monkeypatch.setenv("CISS_WORKSPACE", str(second.root))
    assert find_workspace() == second  # the variable wins over the current folder
    assert find_workspace(first.root) == first  # an explicit path wins over both


def test_find_without_workspace_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CISS_WORKSPACE", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(WorkspaceError) as caught:
        find_workspace()
    root = tmp_path.resolve()
    assert str(caught.value) == f"no ciss workspace at {root}; run `ciss init {root}` or pass --workspace"


def test_catalog_url_is_the_workspace_file_unless_set(tmp_path: Path) -> None:
    workspace = Workspace(tmp_path)
    assert workspace.catalog_url(Settings()) == f"sqlite:///{tmp_path}/catalog.sqlite"
    settings = parse_settings("[catalog]\nurl = 'postgresql://ciss@db/ciss'\n")
    assert workspace.catalog_url(settings) == "postgresql://ciss@db/ciss"
    assert workspace.current == tmp_path / "models" / "current"
    assert workspace.lock_path == tmp_path / "daemon.lock"
