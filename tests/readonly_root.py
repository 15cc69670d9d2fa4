"""Run a command the way a hardened container runs it, without a container engine.

Used by the image start-up test as ``unshare -m --propagation private -- python -m tests.readonly_root
--uid UID --state DIR --hold DIR -- COMMAND...`` (as root): inside the new mount namespace it makes every
mount read-only (``readOnlyRootFilesystem``, compose's ``read_only``), mounts a fresh tmpfs owned by UID
at DIR (the state volume), proves with real writes that nothing else is writable, and then execs COMMAND as
UID with no capabilities and no_new_privs. The process keeps its PID across every exec, so the caller can
signal it and look into its namespace through ``/proc/PID/root``.

One concession to the host's layout: an interpreter installed under a directory other users cannot
traverse (pyenv in ``/root``) is made reachable by a tmpfs over that directory with only the needed
subtrees bound back in. In the image Python lives in ``/usr/local``; nothing here widens what the command
can write.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import stat
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

NOT_READ_ONLY = 97  # exit status when the namespace could not be made read-only


def mount(*args: str) -> None:
    proc = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        fail(f"mount {' '.join(args)}: {proc.stderr.strip()}")


def fail(message: str) -> None:
    print(f"readonly_root: {message}", file=sys.stderr)
    raise SystemExit(NOT_READ_ONLY)


def mount_points() -> list[str]:
    """Every mount point in this namespace, parents before children (mountinfo field 5)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        raw = line.split(" ")[4]
        points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), raw))
    return points


def closed_ancestors(paths: list[Path]) -> dict[Path, set[str]]:
    """For each path, the first ancestor other users cannot traverse, and the child names under it
    that must stay reachable."""
    needed: dict[Path, set[str]] = defaultdict(set)
    for path in paths:
        parts = path.resolve().parts
        for depth in range(1, len(parts) - 1):
            ancestor = Path(*parts[: depth + 1])
            if not os.stat(ancestor).st_mode & stat.S_IXOTH:
                needed[ancestor].add(parts[depth + 1])
                break
    return needed


def open_up(needed: dict[Path, set[str]], hold: Path) -> None:
    for index, (ancestor, children) in enumerate(sorted(needed.items())):
        holders = []
        for child in sorted(children):
            holder = hold / f"{index}-{child}"
            holder.mkdir()
            mount("--bind", str(ancestor / child), str(holder))
            holders.append((child, holder))
        mount("-t", "tmpfs", "-o", "mode=0755,size=1m", "egress-test-opened", str(ancestor))
        for child, holder in holders:
            (ancestor / child).mkdir()
            mount("--move", str(holder), str(ancestor / child))


def make_read_only() -> None:
    for point in mount_points():
        mount("-o", "remount,bind,ro", point)


def assert_unwritable(paths: list[Path]) -> None:
    """Real writes, as root: only EROFS (or a missing directory) is acceptable."""
    for directory in paths:
        probe = directory / ".egress-readonly-probe"
        try:
            fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError as exc:
            if exc.errno in (errno.EROFS, errno.ENOENT):
                continue
            fail(f"{directory}: unexpected {exc!r}")
        os.close(fd)
        os.unlink(probe)
        fail(f"{directory} is still writable in the namespace")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.readonly_root")
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--state", type=Path, required=True, help="tmpfs mount point for UID")
    parser.add_argument("--hold", type=Path, required=True, help="empty scratch directory")
    parser.add_argument("--reachable", type=Path, action="append", default=[])
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if os.geteuid() != 0 or not command:
        fail("run as root with a command after --")
    reachable = [Path(sys.base_prefix), Path(sys.prefix), *args.reachable]
    open_up(closed_ancestors(reachable), args.hold)
    make_read_only()
    home = Path(os.environ.get("HOME", "/nonexistent"))
    assert_unwritable(
        [Path("/"), Path("/tmp"), Path("/var/tmp"), home, *(p.resolve() for p in reachable)]
    )
    mount(
        "-t", "tmpfs", "-o", f"mode=0700,uid={args.uid},gid={args.uid},size=16m",
        "egress-test-state", str(args.state),
    )  # fmt: skip
    os.execvp(
        "setpriv",
        [
            "setpriv", f"--reuid={args.uid}", f"--regid={args.uid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--", *command,
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
