"""Choosing and preparing the state directory (the real start-up is in tests/test_image_start.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.app import statedir
from proxy.app.cli import build_parser


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"EGRESS_STATE_DIR": "/srv/egress", "XDG_STATE_HOME": "/x", "HOME": "/h"}, "/srv/egress"),
        ({"XDG_STATE_HOME": "/x", "HOME": "/h"}, "/x/agent-egress"),
        ({"XDG_STATE_HOME": "relative", "HOME": "/h"}, "/h/.local/state/agent-egress"),
        ({"EGRESS_STATE_DIR": "", "HOME": "/h"}, "/h/.local/state/agent-egress"),
    ],
)
def test_default_state_dir_follows_env_then_xdg_then_home(
    environ: dict[str, str], expected: str
) -> None:
    assert statedir.default_state_dir(environ) == Path(expected)


def test_a_relative_home_is_not_a_state_dir() -> None:
    with pytest.raises(statedir.StateDirError, match="--state-dir"):
        statedir.default_state_dir({"HOME": "relative"})


def test_prepare_creates_private_directories(tmp_path: Path) -> None:
    state = statedir.prepare_state_dir(tmp_path / "a" / "state")
    assert state == tmp_path / "a" / "state"
    confdir = statedir.mitmproxy_confdir(state)
    assert confdir.is_dir()
    assert (confdir.stat().st_mode & 0o777) == 0o700
    assert [p.name for p in confdir.iterdir()] == []  # the write probe is gone
    assert statedir.prepare_state_dir(state) == state  # idempotent


def test_prepare_names_the_directory_that_fails(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(statedir.StateDirError, match=rf"{tmp_path}/file/s: Not a directory"):
        statedir.prepare_state_dir(tmp_path / "file" / "s")
    with pytest.raises(statedir.StateDirError, match=rf"{tmp_path}/file: not a directory"):
        statedir.prepare_state_dir(tmp_path / "file")


def test_the_state_directory_a_joined_sandbox_hides_is_made_when_there_is_none(
    tmp_path: Path,
) -> None:
    """A sandbox served by a gate elsewhere must not be the one to make this user's state
    directory (the next own gate would read the approvals it wrote there): it is made first, empty
    and private, so that it can be hidden. A dangling link stays named (it cannot be hidden, and
    the run does not start); a path that cannot be made is not hidden."""
    state = tmp_path / "a" / "state"
    assert statedir.state_dir_to_hide(str(state)) == str(state)
    assert state.is_dir() and (state.stat().st_mode & 0o777) == 0o700
    assert list(state.iterdir()) == []
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    assert statedir.state_dir_to_hide(str(tmp_path / "link")) == str(tmp_path / "link")
    (tmp_path / "file").write_text("")
    assert statedir.state_dir_to_hide(str(tmp_path / "file" / "s")) is None


def test_serve_takes_state_dir() -> None:
    args = build_parser().parse_args(["serve", "--state-dir", "/var/lib/egress"])
    assert args.state_dir == "/var/lib/egress"
    assert build_parser().parse_args(["serve"]).state_dir is None
