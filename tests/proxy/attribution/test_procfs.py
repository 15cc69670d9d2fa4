"""The process lookup against a /proc tree laid out as the kernel does (files and links in a
temporary directory): which walks are kept, and what is always read afresh."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from proxy.attribution import procfs
from proxy.attribution.procfs import SandboxProcesses
from proxy.core.decision import Decision, Kind, Reason, Verdict
from proxy.core.executables import check_executables
from proxy.policy.executables import Executable

GATE = ("127.0.0.1", 3128)
PEER = "127.0.0.1:58412"  # 0100007F:E42C in the table below
INODE = 5146133
TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0C38 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5146105 1
   3: 0100007F:E42C 0100007F:0C38 01 00000000:00000000 00:00000000 00000000     0        0 5146133 1
"""
WAIT_S = 10
ROOT = 100  # the sandbox helper (host pid); 201 is the sandbox's init, 202 its command
PYTHON = os.path.realpath(sys.executable)


class FakeProc:
    """A /proc with the helper, its init, the command and whatever processes a test adds."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.counter = 300
        (base / str(ROOT) / "net").mkdir(parents=True)
        (base / str(ROOT) / "net" / "tcp").write_text(TCP)
        self.process(ROOT, 1, 0, "/usr/bin/python3")
        self.process(201, ROOT, 1, "/usr/bin/python3")
        self.process(202, 201, 2, "/bin/sh")
        self.write_counter()

    def write_counter(self) -> None:
        (self.base / "loadavg").write_text(f"0.00 0.01 0.05 1/123 {self.counter}\n")

    def fork(self) -> None:
        """What a fork anywhere on the host does to the kernel's pid counter."""
        self.counter += 1
        self.write_counter()

    def process(self, pid: int, ppid: int, nspid: int, exe: str, comm: str = "x") -> None:
        d = self.base / str(pid)
        (d / "task" / str(pid)).mkdir(parents=True, exist_ok=True)
        (d / "fd").mkdir(exist_ok=True)
        (d / "status").write_text(f"Name:\t{comm}\nPPid:\t{ppid}\nNSpid:\t{pid}\t{nspid}\n")
        (d / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1\n")
        (d / "cmdline").write_bytes(os.fsencode(exe) + b"\0")
        self.relink(pid, exe)
        if ppid in (ROOT, 201, 202) or (self.base / str(ppid)).exists():
            children = self.base / str(ppid) / "task" / str(ppid) / "children"
            listed = children.read_text().split() if children.exists() else []
            children.write_text(" ".join([*listed, str(pid)]) + " ")

    def relink(self, pid: int, exe: str) -> None:
        """``exe`` points at a real file (its identity is read); the path recorded is the link's."""
        link = self.base / str(pid) / "exe"
        if link.is_symlink():
            link.unlink()
        link.symlink_to(exe if os.path.exists(exe) else PYTHON)

    def holds(self, pid: int, fd: int, inode: int = INODE) -> None:
        (self.base / str(pid) / "fd" / str(fd)).symlink_to(f"socket:[{inode}]")

    def exit(self, pid: int) -> None:
        """A process that exited and was reaped: its /proc directory is gone (its children are
        adopted: :meth:`reparent` them)."""
        shutil.rmtree(self.base / str(pid))

    def reparent(self, pid: int, ppid: int) -> None:
        stat = self.base / str(pid) / "stat"
        fields = stat.read_text().split()
        fields[3] = str(ppid)
        stat.write_text(" ".join(fields) + "\n")
        status = self.base / str(pid) / "status"
        status.write_text(status.read_text().replace("PPid:\t", f"PPid:\t{ppid}\nOld:\t"))


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    fake = FakeProc(tmp_path)
    fake.process(203, 202, 3, "/usr/bin/curl")
    fake.holds(203, 5)
    return fake


def _lookups(fake: FakeProc) -> SandboxProcesses:
    return SandboxProcesses(ROOT, GATE, proc=str(fake.base))


def test_the_owner_and_its_parents_are_found(proc: FakeProc) -> None:
    found = _lookups(proc).attribute(PEER)
    assert found is not None
    assert (found.pid, found.host_pid, found.ppid) == (3, 203, 2)
    assert found.exe == os.readlink(proc.base / "203" / "exe")
    assert found.argv == ("/usr/bin/curl",)
    assert found.parents == (f"2 {os.readlink(proc.base / '202' / 'exe')}",)


def test_a_kept_walk_answers_on_the_callers_thread_while_no_pid_was_allocated(
    proc: FakeProc,
) -> None:
    lookups = _lookups(proc)
    with pytest.raises(BlockingIOError):  # nothing walked yet: the caller hands it to a thread
        lookups.attribute_now(PEER)
    assert lookups.attribute(PEER) is not None
    # The tree is not read again: with the children lists gone, the kept walk still answers.
    for children in proc.base.glob("*/task/*/children"):
        children.unlink()
    found = lookups.attribute_now(PEER)
    assert found is not None and found.host_pid == 203
    proc.fork()  # a pid allocated anywhere: the walk is stale, and now finds nothing
    with pytest.raises(BlockingIOError):
        lookups.attribute_now(PEER)
    assert lookups.attribute(PEER) is None


def test_a_process_created_after_the_walk_is_found_once_the_counter_moves(
    proc: FakeProc,
) -> None:
    lookups = _lookups(proc)
    assert lookups.attribute(PEER).host_pid == 203  # type: ignore[union-attr]
    proc.process(204, 203, 4, "/usr/bin/git")  # a child that inherited the socket
    proc.holds(204, 7)
    proc.fork()
    found = lookups.attribute(PEER)
    assert found is not None and (found.host_pid, found.pid) == (204, 4)  # the newest owner


def test_what_a_process_is_is_read_afresh_under_a_kept_walk(proc: FakeProc) -> None:
    """``exec`` and adoption allocate no pid: the executable and command line are read on every
    lookup, and a parent the walk found that has exited since is noticed (its child's parent is
    then read afresh), never taken from the kept walk."""
    lookups = _lookups(proc)
    first = lookups.attribute(PEER)
    assert first is not None and first.ppid == 2
    proc.relink(203, "/bin/sh")  # the process exec'd another program
    (proc.base / "203" / "cmdline").write_bytes(b"sh\0-c\0true\0")
    proc.exit(202)
    proc.reparent(203, 201)  # its parent exited: init adopted it
    again = lookups.attribute_now(PEER)
    assert again is not None
    assert again.exe == os.readlink(proc.base / "203" / "exe") != first.exe
    assert again.argv == ("sh", "-c", "true")
    assert (again.ppid, again.parents) == (1, ())


def test_a_parent_the_walk_found_is_taken_from_it_while_it_lives(proc: FakeProc) -> None:
    """A process is adopted only when its parent exits, and a living parent's pid cannot have been
    reused without an allocation: while the parent's executable can be read, the walk's parent
    stands and no ``stat`` is read (one system call per process in the chain). Reading it shows
    the parent is still that process."""
    lookups = _lookups(proc)
    first = lookups.attribute(PEER)
    assert first is not None and first.parents == (f"2 {os.readlink(proc.base / '202' / 'exe')}",)
    for pid in (202, 203):  # a read of either stat would now fail the lookup
        (proc.base / str(pid) / "stat").write_text("garbage\n")
    proc.relink(202, "/bin/bash")  # the parent exec'd: the chain says what it runs now
    again = lookups.attribute_now(PEER)
    assert again is not None and again.ppid == 2
    assert again.parents == (f"2 {os.readlink(proc.base / '202' / 'exe')}",) != first.parents


def test_a_parent_that_exited_since_the_walk_sends_the_lookup_to_stat(proc: FakeProc) -> None:
    """Between two parents: the owner's parent exited and a shell further up adopted it (a
    subreaper), without a pid allocated. The walk's parent is gone, so every parent is read
    afresh: the chain names the adopter, not the process that exited."""
    proc.process(204, 202, 4, "/usr/bin/make")
    proc.process(205, 204, 5, "/usr/bin/curl")
    proc.holds(205, 6, inode=INODE)
    (proc.base / "203" / "fd" / "5").unlink()
    lookups = _lookups(proc)
    first = lookups.attribute(PEER)
    assert first is not None and first.host_pid == 205 and first.ppid == 4
    proc.exit(204)
    proc.reparent(205, 202)
    again = lookups.attribute_now(PEER)
    assert again is not None and again.ppid == 2
    assert again.parents == (f"2 {os.readlink(proc.base / '202' / 'exe')}",)


def _zombie(fake: FakeProc, pid: int) -> None:
    """Exited, not reaped: /proc/PID stays, its exe link does not read (the kernel: ENOENT)."""
    (fake.base / str(pid) / "exe").unlink()


def _searches(lookups: SandboxProcesses) -> list[tuple[str, int]]:
    """Every socket lookup (sock_diag or the TCP table) a search makes: one per search."""
    calls: list[tuple[str, int]] = []
    real = lookups._inode

    def counting(local: tuple[str, int]) -> int | None:
        calls.append(local)
        return real(local)

    lookups._inode = counting  # type: ignore[method-assign]
    return calls


def test_a_zombie_parent_sends_the_lookup_to_stat(proc: FakeProc) -> None:
    """The kernel adopts a child as its parent exits, before the parent is reaped: the zombie's
    exe does not read, so the adopter is named."""
    lookups = _lookups(proc)
    assert lookups.attribute(PEER).ppid == 2  # type: ignore[union-attr]
    _zombie(proc, 202)
    proc.reparent(203, 201)
    searches = _searches(lookups)
    again = lookups.attribute_now(PEER)
    assert again is not None and (again.ppid, again.parents) == (1, ())
    assert len(searches) == 1  # the parents read again, not the socket looked for again


def test_a_parent_that_lives_but_does_not_read_costs_no_second_search(proc: FakeProc) -> None:
    """A parent whose executable cannot be read while it lives (its leader thread ended while
    another runs; a program the gate may not read): the chain stops there, as it always did, and
    the lookup reads the owner's stat once more, not the socket and fd tables again (a process
    could otherwise double the lookup of every connection it makes, on the event loop)."""
    lookups = _lookups(proc)
    assert lookups.attribute(PEER) is not None
    _zombie(proc, 202)  # 203's stat still names 202
    searches = _searches(lookups)
    found = lookups.attribute_now(PEER)
    assert found is not None and (found.ppid, found.parents) == (None, ())
    assert len(searches) == 1


def test_a_child_of_a_non_leader_thread_has_its_parent_read_from_stat(proc: FakeProc) -> None:
    """203 was forked by thread 2020 of 202. When 202 exits, 2020 may finish first: with the
    leader already exiting, no thread is left to take 203, which init adopts at once, while the
    leader still has its memory, so /proc/202/exe still reads (on the real kernel a process can
    stretch that gap to a tenth of a second, and no pid is allocated: the walk is kept). Only a
    child of the leader thread takes its parent from the walk."""
    listed = proc.base / "202" / "task" / "202" / "children"
    listed.write_text(listed.read_text().replace("203 ", ""))
    (proc.base / "202" / "task" / "2020").mkdir()
    (proc.base / "202" / "task" / "2020" / "children").write_text("203 ")
    lookups = _lookups(proc)
    first = lookups.attribute(PEER)
    assert first is not None and first.ppid == 2
    proc.reparent(203, 201)  # adopted; 202's exe still reads (its leader's memory is still there)
    found = lookups.attribute_now(PEER)
    assert found is not None
    assert (found.ppid, found.parents) == (1, ())


def test_first_sight_after_an_adoption_and_the_walks_parent_gone_agree(proc: FakeProc) -> None:
    lookups = _lookups(proc)
    lookups._walk()  # walked: 203 under 202; nothing read of 203 yet
    _zombie(proc, 202)
    proc.reparent(203, 201)
    first = lookups.attribute_now(PEER)  # 203's status (first sight) says 201
    again = lookups.attribute_now(PEER)  # the walk says 202, which does not read
    assert first is not None and again is not None
    assert (first.ppid, first.parents) == (again.ppid, again.parents) == (1, ())


def test_a_search_for_every_owner_whose_parent_does_not_read_keeps_its_owners(
    proc: FakeProc,
) -> None:
    """What a rule bound to executables checks (the owners, their files, ``complete``) never
    rests on the parents: a parent that does not read changes the chain only."""
    lookups = _lookups(proc)
    assert lookups.attribute(PEER, every_owner=True) is not None
    _zombie(proc, 202)
    searches = _searches(lookups)
    found = lookups.attribute(PEER, every_owner=True)
    assert found is not None and found.complete
    assert found.exes == {os.readlink(proc.base / "203" / "exe")}
    assert (found.ppid, found.parents) == (None, ())
    assert len(searches) == 1


def test_without_identity_the_executable_is_named_and_its_file_not_read(
    proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evidence names an executable by its path; the file's identity (one stat of the link)
    is read only when asked, and always for a search of every owner (what a bound rule checks)."""
    stats: list[str] = []
    real = os.stat

    def counting(path: str, *args: object, **kwargs: object) -> os.stat_result:
        if str(path).endswith("/exe"):
            stats.append(str(path))
        return real(path, *args, **kwargs)  # type: ignore[arg-type]

    lookups = _lookups(proc)
    monkeypatch.setattr(procfs.os, "stat", counting)
    plain = lookups.attribute(PEER, identity=False)
    assert plain is not None and plain.exe == os.readlink(proc.base / "203" / "exe")
    assert plain.exe_ids == frozenset() and not stats
    inline = lookups.attribute_now(PEER, identity=False)
    assert inline is not None and inline.exe_ids == frozenset() and not stats
    every = lookups.attribute(PEER, every_owner=True, identity=False)
    assert every is not None and every.exe_ids and stats
    stats.clear()
    kept = lookups.attribute_now(PEER)
    assert kept is not None and kept.exe_ids and stats


def test_a_connection_on_an_fd_a_closed_one_vacated_is_found_without_listing_the_table(
    proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client with connections in flight opens its next on the lowest free fd, often one a
    closed connection vacated, which no scan has passed: that fd is read before the fd table is
    listed. It is a hint like the others: what it holds now decides (another socket there is
    noted for its own lookup)."""
    peers = {"127.0.0.1:58413": 5146141, "127.0.0.1:58414": 5146142, "127.0.0.1:58415": 5146143}
    lines = [
        f"   {n}: 0100007F:{int(p.rsplit(':', 1)[1]):04X} 0100007F:0C38 01 00000000:00000000 "
        f"00:00000000 00000000     0        0 {inode} 1"
        for n, (p, inode) in enumerate(peers.items(), start=4)
    ]
    (proc.base / str(ROOT) / "net" / "tcp").write_text(TCP + "\n".join(lines) + "\n")
    a, b, c = peers
    for fd in range(10, 30):
        (proc.base / "203" / "fd" / str(fd)).symlink_to(f"pipe:[{fd}]")
    proc.holds(203, 6, inode=peers[a])
    proc.holds(203, 7, inode=peers[b])
    lookups = _lookups(proc)
    for peer in (a, b, PEER):  # PEER's, on fd 5, last: the fd its process last held one on
        assert lookups.attribute(peer) is not None
    lookups.forget(a)  # a's connection closed: fd 6 vacated
    (proc.base / "203" / "fd" / "6").unlink()
    proc.holds(203, 6, inode=peers[c])
    listed: list[str] = []
    real = os.listdir

    def listing(path: str) -> list[str]:
        listed.append(path)
        return real(path)

    monkeypatch.setattr(procfs.os, "listdir", listing)
    found = lookups.attribute_now(c)
    assert found is not None and found.host_pid == 203
    assert not [p for p in listed if p.endswith("/fd")]
    # Tried once: a vacated fd that now holds a socket other than the one looked for is noted
    # where that socket's own lookup reads first, and the search goes on to the table.
    lookups.forget(c)  # fd 6 vacated again, and taken by a socket not yet looked up
    (proc.base / "203" / "fd" / "6").unlink()
    (proc.base / "203" / "fd" / "6").symlink_to("socket:[999]")
    (proc.base / "203" / "fd" / "5").unlink()
    (proc.base / "203" / "fd" / "31").symlink_to(f"socket:[{INODE}]")  # PEER's, on a new fd
    again = lookups.attribute_now(PEER)
    assert again is not None and again.host_pid == 203
    assert lookups._seen.get("socket:[999]") == (203, "6")
    assert not lookups._vacated[203]


def test_a_connection_handed_on_does_not_vacate_its_fd(proc: FakeProc) -> None:
    """The front end hands a connection to mitmproxy's layers by forgetting it and the layers
    remembering it at once: it still holds its fd, which is not a hint for the next socket."""
    lookups = _lookups(proc)
    found = lookups.attribute(PEER)
    assert found is not None and lookups._held[PEER] == (203, "5")
    lookups.forget(PEER)
    assert "5" in lookups._vacated[203]
    lookups.remember(PEER, found)
    assert "5" not in lookups._vacated[203] and lookups._held[PEER] == (203, "5")
    lookups.forget(PEER)  # and its close, later, vacates it
    assert "5" in lookups._vacated[203]


def test_the_vacated_fds_of_a_process_that_has_gone_are_dropped(proc: FakeProc) -> None:
    lookups = _lookups(proc)
    assert lookups.attribute(PEER) is not None
    lookups.forget(PEER)
    proc.exit(203)
    assert lookups.attribute(PEER) is None  # (its socket is nobody's now)
    assert 203 not in lookups._vacated


def test_forgetting_a_connection_while_a_lookup_takes_a_vacated_fd_is_safe(
    proc: FakeProc,
) -> None:
    """``forget`` (the event loop) drops a process's oldest vacated fd while a lookup (the worker
    thread) takes from the same fds: neither may fail (a failed ``forget`` would lose the record
    of the connection's close). Real threads, with the interpreter switching as often as it can."""
    lookups = _lookups(proc)
    stop = threading.Event()
    errors: list[BaseException] = []

    def lookups_without_end() -> None:
        while not stop.is_set():
            try:
                lookups._owns(203, "socket:[1]", [None])
            except BaseException as exc:  # reported by the test
                errors.append(exc)
                return

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    worker = threading.Thread(target=lookups_without_end, daemon=True)
    worker.start()
    try:
        for n in range(20_000):
            lookups._held[f"127.0.0.1:{n}"] = (203, str(100 + n % 64))
            lookups.forget(f"127.0.0.1:{n}")
    finally:
        stop.set()
        worker.join(5)
        sys.setswitchinterval(old)
    assert not errors
    assert len(lookups._vacated.get(203, {})) <= procfs.VACATED_FDS


def test_a_search_for_every_owner_always_walks_the_tree(proc: FakeProc) -> None:
    """What a rule bound to executables decides on never rests on a kept walk: here a process
    appears without the counter moving (which the kernel never does), and is still found."""
    lookups = _lookups(proc)
    assert lookups.attribute(PEER) is not None
    proc.process(204, 202, 4, "/usr/bin/git")
    proc.holds(204, 9)
    every = lookups.attribute(PEER, every_owner=True)
    assert every is not None and every.complete
    assert every.exes == {
        os.readlink(proc.base / "203" / "exe"),
        os.readlink(proc.base / "204" / "exe"),
    }


def test_a_kept_walk_expires(proc: FakeProc, monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = _lookups(proc)
    assert lookups.attribute(PEER) is not None
    monkeypatch.setattr(procfs, "CENSUS_AGE", -1.0)
    with pytest.raises(BlockingIOError):
        lookups.attribute_now(PEER)


def test_a_large_sandbox_is_searched_off_the_callers_thread(
    proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups = _lookups(proc)
    assert lookups.attribute(PEER) is not None
    monkeypatch.setattr(procfs, "INLINE_PROCESSES", 2)  # the walk holds 3 processes
    with pytest.raises(BlockingIOError):
        lookups.attribute_now(PEER)


def test_without_the_pid_counter_every_lookup_walks(proc: FakeProc) -> None:
    (proc.base / "loadavg").unlink()
    lookups = _lookups(proc)
    assert lookups.attribute(PEER) is not None
    with pytest.raises(BlockingIOError):
        lookups.attribute_now(PEER)
    (proc.base / "loadavg").write_text("garbage\n")
    lookups.close()
    with pytest.raises(BlockingIOError):
        lookups.attribute_now(PEER)


def test_an_unreadable_counter_is_never_a_kept_walk(proc: FakeProc) -> None:
    (proc.base / "loadavg").write_text("0.00 0.01\n")  # not the kernel's five fields
    lookups = _lookups(proc)
    assert lookups.attribute(PEER) is not None
    with pytest.raises(BlockingIOError):
        lookups.attribute_now(PEER)


def test_the_newest_descriptor_is_read_first(proc: FakeProc) -> None:
    for fd in range(10, 40):
        (proc.base / "203" / "fd" / str(fd)).symlink_to(f"pipe:[{fd}]")
    proc.holds(203, 41)
    (proc.base / "203" / "fd" / "5").unlink()
    read: list[str] = []
    real = os.readlink

    def readlink(path: str) -> str:
        read.append(path)
        return real(path)

    lookups = _lookups(proc)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(procfs.os, "readlink", readlink)
        found = lookups.attribute(PEER)
    assert found is not None and found.host_pid == 203
    fds = [p.rsplit("/", 1)[1] for p in read if "/fd/" in p]
    assert fds == ["41"]


def test_a_command_name_with_parentheses_and_spaces_does_not_move_the_parent(
    proc: FakeProc,
) -> None:
    lookups = _lookups(proc)
    assert lookups.attribute(PEER) is not None
    proc.exit(202)  # so the parent is read from stat, where init now is
    (proc.base / "203" / "stat").write_text("203 (a) S 999 (b) S 1) S 201 203 203 0 -1\n")
    found = lookups.attribute_now(PEER)
    assert found is not None and found.ppid == 1


def test_a_huge_fd_table_is_searched_off_the_callers_thread(
    proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups = _lookups(proc)
    assert lookups.attribute(PEER) is not None
    for fd in range(10, 20):
        (proc.base / "203" / "fd" / str(fd)).symlink_to(f"pipe:[{fd}]")
    (proc.base / "203" / "fd" / "5").unlink()
    proc.holds(203, 25)  # not on its last socket's fd: the table must be listed
    monkeypatch.setattr(procfs, "INLINE_FDS", 8)
    with pytest.raises(BlockingIOError):
        lookups.attribute_now(PEER)
    found = lookups.attribute(PEER)  # the worker thread's search has no such bound
    assert found is not None and found.host_pid == 203


def test_the_sandboxs_init_is_read_once(proc: FakeProc) -> None:
    """Every chain ends at init (pid 1, the helper's child), which a chain records only as its
    pid: its /proc files are read by the first lookup and no later one."""
    lookups = _lookups(proc)
    first = lookups.attribute(PEER)
    assert first is not None and first.parents == (f"2 {os.readlink(proc.base / '202' / 'exe')}",)
    for name in ("stat", "status", "exe"):
        (proc.base / "201" / name).unlink()  # a later read of init's files would find nothing
    again = lookups.attribute_now(PEER)
    assert again == first
    proc.exit(202)
    proc.reparent(203, 201)  # init adopted the owner: its ppid is init's pid inside
    adopted = lookups.attribute_now(PEER)
    assert adopted is not None and (adopted.ppid, adopted.parents) == (1, ())


def test_a_process_is_first_looked_for_on_the_fd_of_its_last_socket(
    proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's next socket usually takes the fd its last one freed: one readlink instead of
    listing its fd table; a socket on another fd is still found (the table is listed then)."""
    listed: list[str] = []
    listdir = os.listdir

    def counting(path: str) -> list[str]:
        if str(path).endswith("/fd"):
            listed.append(str(path))
        return listdir(path)

    monkeypatch.setattr(procfs.os, "listdir", counting)
    lookups = _lookups(proc)
    assert lookups.attribute(PEER).host_pid == 203  # type: ignore[union-attr]
    assert len(listed) == 1
    assert lookups.attribute_now(PEER).host_pid == 203  # type: ignore[union-attr]
    assert len(listed) == 1  # the same fd: read by its number
    (proc.base / "203" / "fd" / "5").unlink()
    proc.holds(203, 9)  # the socket now on another fd
    assert lookups.attribute_now(PEER).host_pid == 203  # type: ignore[union-attr]
    assert len(listed) == 2
    (proc.base / "203" / "fd" / "9").unlink()
    proc.holds(203, 9, inode=INODE + 1)  # its last fd now holds another socket: not this one
    assert lookups.attribute_now(PEER) is None


PEER2 = "127.0.0.1:58413"  # a second client socket of the same table (0100007F:E42D)


def _second_socket(proc: FakeProc) -> None:
    table = proc.base / str(ROOT) / "net" / "tcp"
    second = "   4: 0100007F:E42D 0100007F:0C38 01 00000000:00000000 00:00000000 00000000"
    table.write_text(table.read_text() + f"{second}     0        0 {INODE + 1} 1\n")


def test_a_socket_an_earlier_scan_passed_is_read_by_its_fd(
    proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client with connections in flight: the scan for one reads the fds of the others on its
    way, and the lookup of each of those is then one readlink, no listing. The fd is only a place
    to look: a socket moved since is found by listing, and a newer process that holds the socket
    too is still the owner reported (the newest first, as without the hint)."""
    _second_socket(proc)
    proc.holds(203, 20, inode=INODE + 1)  # above the first socket's fd 5: the scan passes it
    (proc.base / "203" / "fd" / "21").symlink_to("pipe:[77]")
    listed: list[str] = []
    read: list[str] = []
    listdir, readlink = os.listdir, os.readlink

    def counting_listdir(path: str) -> list[str]:
        listed.append(str(path))
        return listdir(path)

    def counting_readlink(path: str) -> str:
        read.append(str(path))
        return readlink(path)

    monkeypatch.setattr(procfs.os, "listdir", counting_listdir)
    monkeypatch.setattr(procfs.os, "readlink", counting_readlink)
    lookups = _lookups(proc)
    assert lookups.attribute(PEER).host_pid == 203  # type: ignore[union-attr]
    listed.clear()
    read.clear()
    found = lookups.attribute_now(PEER2)
    assert found is not None and found.host_pid == 203
    assert not [p for p in listed if p.endswith("/fd")]
    assert [p.rsplit("/", 2)[1:] for p in read if "/fd/" in p] == [["fd", "20"]]

    # Moved to another fd since a scan saw it: found by listing the table.
    lookups = _lookups(proc)
    assert lookups.attribute(PEER) is not None
    (proc.base / "203" / "fd" / "20").unlink()
    proc.holds(203, 30, inode=INODE + 1)
    listed.clear()
    assert lookups.attribute_now(PEER2).host_pid == 203  # type: ignore[union-attr]
    assert [p for p in listed if p.endswith("/203/fd")]

    # A newer process holding it too is the owner, though the scan saw it at 203.
    lookups = _lookups(proc)
    assert lookups.attribute(PEER) is not None
    proc.process(204, 203, 4, "/usr/bin/git")
    proc.holds(204, 3, inode=INODE + 1)
    proc.fork()
    found = lookups.attribute(PEER2)
    assert found is not None and found.host_pid == 204


def test_a_processs_stat_and_command_line_stay_open_until_it_is_gone(
    proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read through descriptors kept between lookups (one pread each); a descriptor whose process
    has been reaped (the kernel's ESRCH) is closed and the path opened again, which then reads
    whichever process holds the number now, as a read by path always did. ``close`` releases
    them all."""
    opened: list[str] = []
    real_open, real_pread = os.open, os.pread
    stale: set[int] = set()

    def counting_open(path: str, flags: int, *args: int, **kwargs: int) -> int:
        if "/203/" in str(path) and not str(path).endswith("/children"):
            opened.append(str(path).rsplit("/", 1)[1])
        return real_open(path, flags, *args, **kwargs)

    def pread(fd: int, size: int, offset: int) -> bytes:
        if fd in stale:  # once: its number is free for the next open once it is closed
            stale.discard(fd)
            raise ProcessLookupError(3, "No such process")
        return real_pread(fd, size, offset)

    monkeypatch.setattr(procfs.os, "open", counting_open)
    monkeypatch.setattr(procfs.os, "pread", pread)
    lookups = _lookups(proc)
    assert lookups.attribute(PEER) is not None  # status (first sight), then cmdline
    proc.exit(202)  # its parent: the owner's is read from stat from now on
    proc.reparent(203, 201)
    assert lookups.attribute_now(PEER) is not None
    assert lookups.attribute_now(PEER) is not None
    assert sorted(opened) == ["cmdline", "stat", "status"]  # later lookups opened nothing
    stale.update(fd for (pid, _), fd in lookups._files.items() if pid == 203)  # it was reaped
    assert len(stale) == 2
    (proc.base / "203" / "cmdline").write_bytes(b"/usr/bin/git\0fetch\0")
    found = lookups.attribute_now(PEER)
    assert found is not None and found.argv == ("/usr/bin/git", "fetch") and found.ppid == 1
    assert sorted(opened) == ["cmdline", "cmdline", "stat", "stat", "status"]
    assert not stale  # each read through a stale descriptor failed once, and it was not read again
    fresh = [fd for (pid, _), fd in lookups._files.items() if pid == 203]
    lookups.close()
    assert not lookups._files
    for fd in fresh:
        with pytest.raises(OSError):
            os.fstat(fd)


def _leader_ended(fake: FakeProc, pid: int, tid: int, exe: str) -> Path:
    """``pid``'s leader thread has ended while thread ``tid`` runs: /proc/PID/fd is empty and its
    exe does not read, as the kernel shows it; the thread's own directory still reads both."""
    base = fake.base / str(pid)
    for fd in (base / "fd").iterdir():
        fd.unlink()
    (base / "exe").unlink()
    task = base / "task" / str(tid)
    (task / "fd").mkdir(parents=True)
    (task / "exe").symlink_to(exe if os.path.exists(exe) else PYTHON)
    return task


def test_a_connection_from_a_process_whose_leader_thread_ended_is_named(proc: FakeProc) -> None:
    """Ending its leader thread empties /proc/PID/fd: the first-owner search would pass the
    process by, and its connections would go unnamed. Its threads' tables are searched then
    (off the event loop: they are the process's to make large), and its executable is read
    through the thread that holds the socket."""
    task = _leader_ended(proc, 203, 2030, "/usr/bin/curl")
    (task / "fd" / "7").symlink_to(f"socket:[{INODE}]")
    lookups = _lookups(proc)
    found = lookups.attribute(PEER)
    assert found is not None and (found.host_pid, found.pid) == (203, 3)
    assert found.exe == os.readlink(task / "exe")
    with pytest.raises(BlockingIOError):
        lookups.attribute_now(PEER)


def test_a_parent_whose_leader_thread_ended_is_named_by_a_running_thread(proc: FakeProc) -> None:
    """Its children keep its pid as their parent (a running thread takes them), so the chain
    goes on through it, named by that thread's executable; the kept walk's parent is confirmed by
    the leader only, so it is read afresh."""
    lookups = _lookups(proc)
    first = lookups.attribute(PEER)
    assert first is not None and first.parents == (f"2 {os.readlink(proc.base / '202' / 'exe')}",)
    task = _leader_ended(proc, 202, 2020, "/bin/bash")
    for found in (lookups.attribute_now(PEER), lookups.attribute(PEER, every_owner=True)):
        assert found is not None and found.ppid == 2
        assert found.parents == (f"2 {os.readlink(task / 'exe')}",)


def test_a_zombie_keeps_the_lookup_on_the_event_loop(proc: FakeProc) -> None:
    """An exited child not yet reaped shows an empty fd table and no executable too, but no
    thread besides its leader: nothing of it is searched, and the lookups that pass it stay on
    the caller's thread (many sandboxes leave children unreaped for a while)."""
    (proc.base / "203" / "fd" / "5").unlink()
    proc.holds(202, 5)  # the socket is the shell's; 203, newer, has exited
    (proc.base / "203" / "exe").unlink()
    lookups = _lookups(proc)
    assert lookups.attribute(PEER).host_pid == 202  # type: ignore[union-attr]
    found = lookups.attribute_now(PEER)
    assert found is not None and found.host_pid == 202


def test_a_lookup_that_only_names_the_process_reads_few_of_its_threads_tables(
    proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process whose leader has ended can run many threads with tables of their own: naming the
    owner of a socket reads at most MAX_THREAD_READS of them (past that, the process goes unnamed,
    as before), while a search for every owner, which a bound rule decides on, reads them all."""
    task = _leader_ended(proc, 203, 2030, "/usr/bin/curl")
    threads = procfs.MAX_THREAD_READS + 2
    for n in range(1, threads):
        other = proc.base / "203" / "task" / str(2030 + n)
        (other / "fd").mkdir(parents=True)
        (other / "exe").symlink_to(os.readlink(task / "exe"))
    proc.holds(202, 5)  # the socket is the shell's, older than 203
    listed: list[str] = []
    real = os.listdir

    def listing(path: str) -> list[str]:
        if "/203/task/" in str(path) and str(path).endswith("/fd"):
            listed.append(str(path))
        return real(path)

    monkeypatch.setattr(procfs.os, "listdir", listing)
    lookups = _lookups(proc)
    found = lookups.attribute(PEER)
    assert found is not None and found.host_pid == 202
    assert 0 < len(listed) <= procfs.MAX_THREAD_READS
    listed.clear()
    every = lookups.attribute(PEER, every_owner=True)
    assert every is not None and every.host_pid == 202
    assert len(listed) == threads


def test_the_threads_of_a_process_whose_leader_ended_hold_its_sockets_on_the_real_kernel() -> None:
    """What the two tests above rest on, against the real kernel: once a process's leader thread
    has ended (pthread_exit) while another runs, /proc/PID/fd is empty and /proc/PID/exe does not
    read, while the running thread's task directory has both; and the lookup names the process."""
    import socket
    import subprocess

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    code = (
        "import ctypes, socket, sys, threading, time\n"
        f"s = socket.create_connection(('127.0.0.1', {port}))\n"
        "threading.Thread(target=time.sleep, args=(30,)).start()\n"
        "print(s.getsockname()[1], flush=True)\n"
        "ctypes.CDLL(None).pthread_exit(None)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    listener.settimeout(WAIT_S)
    accepted, _ = listener.accept()
    lookups = SandboxProcesses(os.getpid(), ("127.0.0.1", port))
    try:
        assert child.stdout is not None
        client_port = int(child.stdout.readline())
        base = f"/proc/{child.pid}"
        for _ in range(500):  # bounded: until the leader thread has ended
            try:
                os.readlink(f"{base}/exe")
            except OSError:
                break
            time.sleep(0.01)
        assert os.listdir(f"{base}/fd") == []
        found = lookups.attribute(f"127.0.0.1:{client_port}")
        assert found is not None and found.host_pid == child.pid
        assert os.path.realpath(found.exe) == os.path.realpath(sys.executable)
    finally:
        child.kill()
        child.wait(WAIT_S)
        accepted.close()
        listener.close()
        lookups.close()


def test_a_kept_descriptor_follows_its_process_through_exec_and_never_outlives_it() -> None:
    """What the kept files rest on, against the real kernel: a descriptor of /proc/<pid> reads
    the process as it is now (its new command line after ``exec``) and fails once the process
    has been reaped, so it is opened again by path (here: gone)."""
    import subprocess

    child = subprocess.Popen(["sh", "-c", "read line; exec sleep 30"], stdin=subprocess.PIPE)
    lookups = SandboxProcesses(os.getpid(), GATE)
    try:
        for _ in range(500):  # bounded: until the child runs the shell
            if lookups._proc_file(child.pid, procfs._CMDLINE).startswith(b"sh\0-c\0"):
                break
            time.sleep(0.01)
        assert lookups._proc_file(child.pid, procfs._CMDLINE).startswith(b"sh\0-c\0")
        kept = lookups._files[(child.pid, procfs._CMDLINE)]
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        child.stdin.flush()
        for _ in range(500):  # bounded: until the exec has happened
            if lookups._proc_file(child.pid, procfs._CMDLINE) == b"sleep\x0030\x00":
                break
            time.sleep(0.01)
        assert lookups._proc_file(child.pid, procfs._CMDLINE) == b"sleep\x0030\x00"
        assert lookups._files[(child.pid, procfs._CMDLINE)] == kept  # the same descriptor
        stat = lookups._proc_file(child.pid, procfs._STAT)
        assert stat.startswith(f"{child.pid} (sleep) ".encode())
        child.kill()
        child.wait(WAIT_S)
        with pytest.raises(OSError):
            lookups._proc_file(child.pid, procfs._STAT)
        assert (child.pid, procfs._STAT) not in lookups._files
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(WAIT_S)
        lookups.close()


def test_a_slow_read_through_a_kept_file_holds_up_no_other_lookup_and_close(
    proc: FakeProc, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One thread's read through a kept descriptor may be slow (the kernel reads another process's
    memory for its command line): a lookup on another thread reads by path instead of waiting, and
    ``close`` returns at once; the slow reader closes the kept files as it finishes, and nothing
    is kept after ``close``."""
    import threading

    lookups = _lookups(proc)
    assert lookups.attribute(PEER) is not None
    assert lookups.attribute_now(PEER) is not None  # stat and cmdline now kept
    kept = dict(lookups._files)
    inside, release = threading.Event(), threading.Event()
    real_pread = os.pread

    def pread(fd: int, size: int, offset: int) -> bytes:
        if fd in kept.values() and threading.current_thread().name == "slow":
            inside.set()
            assert release.wait(WAIT_S)
        return real_pread(fd, size, offset)

    monkeypatch.setattr(procfs.os, "pread", pread)
    slow = threading.Thread(target=lookups.attribute_now, args=(PEER,), name="slow")
    slow.start()
    try:
        assert inside.wait(WAIT_S)
        found = lookups.attribute_now(PEER)  # by path: the kept files are in use
        assert found is not None and found.host_pid == 203
        lookups.close()  # returns at once
        assert lookups._files == kept  # still being read through
    finally:
        release.set()
        slow.join(WAIT_S)
    assert not lookups._files  # closed by the slow reader on its way out
    for fd in kept.values():
        with pytest.raises(OSError):
            os.fstat(fd)
    assert lookups.attribute(PEER) is not None
    assert not lookups._files  # after close, every read is by path


class PausingLock:
    """The files lock, pausing the thread named ``reader`` as it releases (after its last look)."""

    def __init__(self) -> None:
        import threading

        self.inner = threading.Lock()
        self.pause = False
        self.at_release, self.go = threading.Event(), threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self.inner.acquire(blocking, timeout)

    def release(self) -> None:
        import threading

        if self.pause and threading.current_thread().name == "reader":
            self.at_release.set()
            assert self.go.wait(WAIT_S)
        self.inner.release()


def test_close_between_a_readers_last_look_and_its_release_still_closes_every_file(
    proc: FakeProc,
) -> None:
    import threading

    lookups = _lookups(proc)
    assert lookups.attribute(PEER) is not None
    assert lookups.attribute_now(PEER) is not None
    kept = dict(lookups._files)
    assert kept
    lock = PausingLock()
    lookups._files_lock = lock  # type: ignore[assignment]
    lock.pause = True
    reader = threading.Thread(target=lookups.attribute_now, args=(PEER,), name="reader")
    reader.start()
    try:
        assert lock.at_release.wait(WAIT_S)  # it has looked at the flag: not closed yet
        lookups.close()  # cannot take the lock: returns at once
    finally:
        lock.go.set()
        reader.join(WAIT_S)
    assert not lookups._files
    for fd in kept.values():
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_thread_with_a_file_table_of_its_own_is_told_from_one_sharing_its_leaders() -> None:
    """``kcmp(KCMP_FILES)`` on real threads: one sharing the leader's table is skipped (its table
    is ``/proc/PID/fd``, read already); one that unshared its table is read on its own."""
    if procfs._KCMP is None:
        pytest.skip("no kcmp number for this machine")
    answers: dict[str, bool] = {}
    ready, done = threading.Event(), threading.Event()

    def shared() -> None:
        answers["shared"] = procfs._same_files(os.getpid(), threading.get_native_id())

    def own() -> None:
        os.unshare(os.CLONE_FILES)  # this thread's file table from now on is its own copy
        answers["own"] = procfs._same_files(os.getpid(), threading.get_native_id())
        ready.set()
        done.wait(10)

    for target in (shared, own):
        thread = threading.Thread(target=target)
        thread.start()
        if target is own:
            assert ready.wait(10)
            done.set()
        thread.join(10)
    assert answers == {"shared": True, "own": False}


def _sleepers_past_the_bound(proc: FakeProc, tmp_path: Path) -> tuple[Path, Path]:
    """The sandbox of threat 19 past the walk's bound: a process connects and keeps its socket,
    then forks sleepers (the walk, newest first and depth first, spends its bound on them), then
    hands the socket to the program a rule is bound to."""
    evil, git = tmp_path / "evil", tmp_path / "git"
    evil.write_bytes(b"evil")
    git.write_bytes(b"git")
    proc.process(210, 202, 10, str(evil))  # connected first, and keeps the socket
    proc.holds(210, 5)
    proc.process(211, 202, 11, "/bin/sleep")
    for n in range(20):
        proc.process(400 + n, 211, 100 + n, "/bin/sleep")
    proc.process(212, 202, 12, str(git))  # given the socket last
    proc.holds(212, 7)
    return evil, git


def test_an_owner_past_the_walks_bound_leaves_nobody_vouched_for(
    proc: FakeProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A search for every owner that could not walk every process is not complete (it names the
    first owner it found, for the evidence): a rule bound to the program refuses the connection,
    never passes it as the program's alone."""
    monkeypatch.setattr(procfs, "MAX_PROCESSES", 16)  # 4096 in the product: as many sleepers
    evil, git = _sleepers_past_the_bound(proc, tmp_path)
    every = _lookups(proc).attribute(PEER, every_owner=True)
    assert every is not None and every.exe == str(git) and not every.complete  # (the evidence's)
    st = git.stat()
    bound = (Executable(str(git), (st.st_dev, st.st_ino)),)
    allowed = Decision(
        Verdict.ALLOW,
        Reason.ALLOWED_BY_RULE,
        "git-only",
        Kind.CONNECT,
        "h.test",
        443,
        "v",
        "enforce",
    )
    assert not check_executables(allowed, bound, every).allowed
    # Under the bound the same tree is walked whole, and both owners are found.
    monkeypatch.setattr(procfs, "MAX_PROCESSES", 64)
    whole = _lookups(proc).attribute(PEER, every_owner=True)
    assert whole is not None and whole.complete and whole.exes >= {str(evil), str(git)}


def test_a_walk_cut_at_the_bound_still_names_an_owner_it_found(
    proc: FakeProc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Evidence (the first owner found, newest first) from a cut walk is still a true owner."""
    monkeypatch.setattr(procfs, "MAX_PROCESSES", 16)
    _, git = _sleepers_past_the_bound(proc, tmp_path)
    first = _lookups(proc).attribute(PEER)
    assert first is not None and first.exe == str(git) and not first.complete


def test_an_address_two_open_connections_share_names_neither(proc: FakeProc) -> None:
    """A client that reset a connection the gate still serves can connect again from the same
    port: while both are open the address cannot tell whose a decision is, so it names nobody;
    once one has closed, the other's own process again (a close never forgets another's)."""
    lookups = _lookups(proc)
    found = lookups.attribute(PEER)
    assert found is not None
    old, new = object(), object()
    other = dataclasses.replace(found, pid=99, exe="/usr/bin/other")
    lookups.remember(PEER, found, old)
    assert lookups.known(PEER) is found
    lookups.remember(PEER, other, new)
    assert lookups.known(PEER) is None
    lookups.forget(PEER, old)
    assert lookups.known(PEER) is other
    lookups.forget(PEER, old)  # (again: nothing of the other's goes)
    assert lookups.known(PEER) is other
    lookups.remember(PEER, found, new)  # the same connection, looked up again
    assert lookups.known(PEER) is found
    lookups.forget(PEER, new)
    assert lookups.known(PEER) is None and PEER not in lookups._known
