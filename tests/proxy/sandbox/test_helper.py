"""The helper's read-only mounts (``_freeze``) on directories, in a real sandbox.

A directory kept read-only (the gate's installation) is bound with every mount below it: a path
hidden under it must stay hidden, and a writable file system mounted below it must be read-only too.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from proxy.sandbox.helper import _terminal_injection_filter, _unescape
from proxy.sandbox.namespace import Sandbox, SandboxSpec
from tests.proxy.sandbox.conftest import LISTENERS, WAIT

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[3]


def _in_a_namespace_of_its_own(script: str) -> Any:
    """What ``script`` prints last (JSON), run as root of a user and mount namespace of its own
    (``unshare -rm``): init's steps, without touching the host's mounts."""
    result = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-I", "-c", script],
        capture_output=True,
        text=True,
        timeout=WAIT,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def _run(spec: SandboxSpec) -> str:
    sandbox = Sandbox.spawn(spec, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        sandbox.start()
        out, err = sandbox.proc.communicate(timeout=WAIT)
    finally:
        sandbox.close_sockets()
        if sandbox.proc.poll() is None:
            sandbox.kill()
    return out.decode() + err.decode()


def test_a_path_hidden_inside_a_read_only_directory_stays_hidden(tmp_path: Path) -> None:
    kept = tmp_path / "kept"
    (kept / "secrets").mkdir(parents=True)
    (kept / "secrets" / "token").write_text("s3cr3t-in-dir\n")
    (kept / "key.txt").write_text("s3cr3t-file\n")
    (kept / "open.txt").write_text("visible\n")
    script = (
        f"cat {kept}/secrets/token {kept}/key.txt {kept}/open.txt 2>&1; "
        f'touch {kept}/new 2>/dev/null; echo "write=$?"'
    )
    out = _run(
        SandboxSpec(
            argv=["sh", "-c", script],
            env=dict(os.environ),
            listeners=LISTENERS[:1],
            hidden=[str(kept / "secrets"), str(kept / "key.txt")],
            frozen=[str(kept)],
        )
    )
    assert "visible" in out, out  # the directory itself is there, read-only
    assert "s3cr3t" not in out, out
    assert "write=0" not in out and "write=" in out, out
    assert not (kept / "new").exists()


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
@pytest.mark.parametrize("tree_calls", [True, False], ids=["open_tree", "bind-and-remount"])
def test_a_file_system_mounted_below_a_read_only_directory_is_read_only_too(
    tmp_path: Path, tree_calls: bool
) -> None:
    """init's own steps, run in a user and mount namespace of the test's own (``unshare -rm``):
    the host's mounts are not touched. A writable file system mounted below a directory made
    read-only is read-only too, and a path hidden below it stays hidden; both ways a directory is
    made read-only (the mount API of Linux 5.12, and binding and remounting each mount where the
    kernel lacks it)."""
    kept = tmp_path / "kept"
    (kept / "volume").mkdir(parents=True)
    (kept / "secret").mkdir()
    (kept / "secret" / "token").write_text("s3cr3t\n")
    script = textwrap.dedent(
        f"""
        import ctypes, json, os, sys
        sys.path.insert(0, {str(REPO)!r})
        from proxy.sandbox import helper
        used = []
        if {tree_calls!r}:
            tree = helper._freeze_tree
            def counted(path):
                tree(path)  # _NoTreeCalls where the kernel lacks the calls: not counted
                used.append(path)
            helper._freeze_tree = counted
        else:
            def no_tree_calls(path):
                raise helper._NoTreeCalls
            helper._freeze_tree = no_tree_calls
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"probe", b"{kept}/volume", b"tmpfs", 0, None) != 0:
            sys.exit("mount: errno %d" % ctypes.get_errno())
        open("{kept}/volume/before", "w").close()  # writable until frozen
        helper._hide(["{kept}/secret"])
        helper._freeze(["{kept}"])
        out = {{"listed": sorted(os.listdir("{kept}/volume")),
                "hidden": os.listdir("{kept}/secret"), "tree": bool(used)}}
        for name in ("volume/x", "y"):
            try:
                open("{kept}/" + name, "w").close()
                out[name] = "written"
            except OSError as exc:
                out[name] = os.strerror(exc.errno)
        print(json.dumps(out))
        """
    )
    out = _in_a_namespace_of_its_own(script)
    if tree_calls and not out.pop("tree"):
        pytest.skip("this kernel (or its seccomp filter) has no open_tree/mount_setattr")
    out.pop("tree", None)
    assert out == {
        "listed": ["before"],  # the file system below is still there, read-only
        "hidden": [],
        "volume/x": "Read-only file system",
        "y": "Read-only file system",
    }, out


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (b"/plain/path", b"/plain/path"),
        (b"/with\\040space", b"/with space"),
        (b"/tab\\011and\\012newline", b"/tab\tand\nnewline"),
        (b"/back\\134slash\\040", b"/back\\slash "),
    ],
)
def test_mountinfo_escapes_are_undone(raw: bytes, path: bytes) -> None:
    assert _unescape(raw) == path


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs util-linux unshare")
def test_no_directory_above_a_read_only_path_can_be_renamed(tmp_path: Path) -> None:
    """A mount point cannot be renamed, but a directory holding one could be, mount and all, and
    another put at the old path: every directory above a read-only path is pinned (bound onto
    itself), up to the nearest mount point. Writing and renaming inside them still work."""
    venv = tmp_path / "home" / "tools" / "venv"
    venv.mkdir(parents=True)
    script = textwrap.dedent(
        f"""
        import ctypes, json, os, sys
        sys.path.insert(0, {str(REPO)!r})
        from proxy.sandbox import helper
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"probe", b"{tmp_path}", b"tmpfs", 0, None) != 0:  # the nearest mount point
            sys.exit("mount: errno %d" % ctypes.get_errno())
        os.makedirs("{venv}")
        helper._pin_ancestors(["{venv}"])
        helper._freeze(["{venv}"])
        out = {{}}
        for name, (src, dst) in {{
            "venv": ("{venv}", "{tmp_path}/home/tools/v2"),
            "parent": ("{tmp_path}/home/tools", "{tmp_path}/home/t2"),
            "grandparent": ("{tmp_path}/home", "{tmp_path}/h2"),
        }}.items():
            try:
                os.rename(src, dst)
                out[name] = "renamed"
            except OSError as exc:
                out[name] = os.strerror(exc.errno)
        os.mkdir("{tmp_path}/home/tools/inside")
        os.rename("{tmp_path}/home/tools/inside", "{tmp_path}/home/tools/moved")
        out["inside"] = sorted(os.listdir("{tmp_path}/home/tools"))
        print(json.dumps(out))
        """
    )
    out = _in_a_namespace_of_its_own(script)
    busy = "Device or resource busy"
    assert out == {
        "venv": busy,
        "parent": busy,
        "grandparent": busy,
        "inside": ["moved", "venv"],
    }, out


def _run_filter(program: list[tuple[int, int, int, int]], arch: int, nr: int, request: int) -> int:
    """What the seccomp program returns for one system call (the classic BPF subset it uses)."""
    data = {0: nr, 4: arch, 24: request}
    accumulator, at = 0, 0
    while True:
        code, jt, jf, k = program[at]
        if code == 0x20:
            accumulator = data[k]
        elif code == 0x15:
            at += jt if accumulator == k else jf
        else:
            assert code == 0x06
            return k
        at += 1


@pytest.mark.parametrize(
    ("machine", "arch", "ioctl"),
    [
        ("x86_64", 0xC000003E, 16),
        ("x86_64", 0xC000003E, 0x40000000 | 514),
        ("x86_64", 0x40000003, 54),
        ("aarch64", 0xC00000B7, 29),
        ("aarch64", 0x40000028, 54),
    ],
    ids=["x86_64", "x32", "i386", "aarch64", "arm"],
)
def test_terminal_injection_is_refused_under_every_abi_of_the_machine(
    machine: str, arch: int, ioctl: int
) -> None:
    """A 32-bit program (i386 on x86_64, arm on aarch64) reaches ioctl under another number and
    architecture: TIOCSTI and TIOCLINUX fail with EPERM under each, and nothing else does."""
    program = _terminal_injection_filter(machine)
    assert program is not None
    deny, allow = 0x00050000 | errno.EPERM, 0x7FFF0000
    assert _run_filter(program, arch, ioctl, 0x5412) == deny  # TIOCSTI
    assert _run_filter(program, arch, ioctl, 0x541C) == deny  # TIOCLINUX
    assert _run_filter(program, arch, ioctl, 0x5413) == allow  # TIOCGWINSZ
    assert _run_filter(program, arch, ioctl + 1, 0x5412) == allow  # another call, same number
    assert _run_filter(program, 0x12345678, ioctl, 0x5412) == allow
    assert _terminal_injection_filter("riscv64") is None  # that machine's command gets a session
