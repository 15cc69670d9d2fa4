"""Finding the process behind a sandbox's connection in ``/proc``.

The gate accepts on a listener that lives in the sandbox's network namespace, so the client's socket
is in that namespace's TCP table, readable as ``/proc/<pid>/net/tcp`` of any process inside it (the
sandbox helper, whose host pid the launcher knows). Its line gives the socket's inode; the owner is
the sandbox process with an fd linking to ``socket:[inode]``. The processes searched are exactly the
helper's descendants (every process of the sandbox's PID namespace is one: orphans are reparented to
its init), walked through ``/proc/<pid>/task/<tid>/children``, bounded by MAX_PROCESSES.

Only the kernel's answers are used: ``exe`` is the ``/proc/<pid>/exe`` link (and the file identity
behind it), never ``comm`` or ``argv[0]``, which a process sets itself. Cost: one sock_diag request
and one fd scan of the sandbox's processes per connection (``bench/attribution.py`` prints it).

The walk of the process tree is kept (a :class:`Census`) while no process has been created on the
host since it was taken: the last pid the kernel allocated (``/proc/loadavg``, in the gate's PID
namespace, of which the sandbox's is a child, so every fork inside moves it) is read before the
walk and compared on each lookup, for at most CENSUS_AGE seconds. A process that exited since
only fails its fd scan; a new one, or a reused pid, needs an allocation, which moves the counter.
What a process is (executable, command line) is read afresh on every lookup: ``exec`` allocates no
pid. The parent of a child its parent's leader thread forked is the one the walk found for as long
as that parent's executable reads: the leader hands its children on only after it has let go of its
memory (what ``exe`` reads), and a living parent's pid is still that parent's (a reuse needs an
allocation). A child of another thread may be adopted earlier (once every thread of its parent is
exiting), so its parent is always read from ``stat``; and a parent that cannot be read sends the
lookup back to reading every parent afresh (the owners' from ``stat``), without searching again. A
search for every owner (what a rule bound to executables needs) always walks the tree anew.

The ``stat`` and ``cmdline`` files recent lookups read are kept open (up to KEPT_FILES): a read
is then one ``pread`` where a path costs an open, a read and a close. A descriptor of
``/proc/<pid>`` stays bound to the process it was opened for (the kernel's ``struct pid``, which a
later process with the same number never shares), and each read is generated anew from that
process as it is now: after an ``exec``, its new command line; once it has been reaped, an error,
upon which the path is opened again (as every read did before). They are an optimisation only: a
thread that finds them in use by another (whose read may be slow) reads by path instead of
waiting, and once :meth:`SandboxProcesses.close` has been called every read is by path.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import itertools
import logging
import os
import socket
import threading
import time
from typing import Any, NamedTuple

from proxy.attribution.argv import scrub_argv
from proxy.attribution.argv import warm as warm_argv
from proxy.attribution.process import Attribution, ProcEntry, build
from proxy.attribution.procnet import find_inode
from proxy.attribution.sockdiag import DiagUnavailable, SockDiag

log = logging.getLogger(__name__)

MAX_PROCESSES = (
    4096  # a sandbox with more is searched this far; a search for every owner is then incomplete
)
MAX_CMDLINE = 64 * 1024
CENSUS_AGE = (
    0.25  # seconds a walk is reused for (bounds a pid counter that wrapped to the same value)
)
INLINE_PROCESSES = 64  # a kept walk this small is searched on the caller's thread (no hand-off)
INLINE_FDS = 512  # ... as long as the fd tables it reads stay this small in all
KEPT_FILES = 8  # /proc files kept open per sandbox (limits.DESCRIPTOR_RESERVE counts one sandbox's)
KEPT_BUILT = 32  # attributions kept to be returned again
KNOWN_PEERS = 1 << 16  # open connections' processes kept by peer (far above any connection cap)
SEEN_SOCKETS = 256  # sockets remembered where an fd scan passed them (all forgotten when full)
MAX_THREAD_READS = 8  # threads tried for the executable of a process whose leader has ended
VACATED_FDS = 32  # fds per process whose looked-up connection has closed (the oldest forgotten)
VACATED_TRIES = 3  # of them tried, lowest first, before the fd table is listed
_STAT, _CMDLINE = 0, 1
_KEPT_NAMES = ("stat", "cmdline")
_KEPT_LIMITS = (4096, MAX_CMDLINE)


class Census(NamedTuple):
    """One walk of the sandbox's process tree: its host pids, newest first, and the pid each has in
    the sandbox (learnt as the lookups read them: fixed for a process's life)."""

    counter: bytes  # the host's last allocated pid when the walk began
    taken: float  # time.monotonic() when the walk began
    pids: tuple[int, ...]
    sandbox_pids: dict[int, int]
    parents: dict[int, int]  # host pid -> the host pid it was listed under (its parent then)
    # The walk stopped at MAX_PROCESSES with processes left unvisited: an owner may be among them,
    # so no search of this walk can say it found every owner.
    truncated: bool = False


class _ParentGone(Exception):
    """A parent the walk found has exited since: its children were adopted by another."""


class SandboxProcesses:
    """Attributes connections accepted on the sandbox's listener ``gate`` (its address inside the
    sandbox) to the sandbox's processes, under the helper at host pid ``root``.

    ``attribute(peer)`` only looks up (from any thread). The checkpoint ``remember``s the answer for
    the connection's peer until the connection closes (``forget``); the evidence stamp reads it
    with ``known(peer)``. A lookup whose connection closed first is never remembered."""

    def __init__(
        self,
        root: int,
        gate: tuple[str, int],
        proc: str = "/proc",
        diag: socket.socket | None = None,
    ) -> None:
        self.root = root
        self.diag = SockDiag(diag) if diag is not None else None
        self.gate = gate
        self.proc = proc
        # Peer -> ((connection, its process), ...): the connections from that address that have
        # been looked up and not closed. Two at once (a client reset one and bound the same port
        # again before the gate closed it) make the address ambiguous: known() names nobody until
        # one has closed. Replaced whole under the lock, read without it.
        self._known: dict[str, tuple[tuple[object, Attribution | None], ...]] = {}
        self._lock = threading.Lock()
        self._diag_lock = threading.Lock()
        self._census: Census | None = None
        # The sandbox's init (pid 1, the helper's one child) as first read: every chain ends at it,
        # and what a chain takes from it (its pids) is fixed for the sandbox's life.
        self._init: ProcEntry | None = None
        # The fd each process last held a looked-up socket on: a client's next socket usually gets
        # the number its last one freed, and one readlink of it replaces listing its fd table.
        self._last_fd: dict[int, str] = {}
        # Every socket an fd scan read on its way to the one it looked for, (host pid, fd) by link:
        # a client with many connections opens them in bursts, and the scan for one passes the fds
        # of the next (readlinks per lookup with 16 parallel curl transfers: 9.2 -> 3.6).
        # None of these three caches needs the lock the loop and the lookup thread share for
        # ``_known``: each is read and written by single dict operations (atomic), never iterated,
        # and what they hold is a hint checked by the readlink it saves (the fds) or the same value
        # whoever writes it (init).
        self._seen: dict[str, tuple[int, str]] = {}
        # The fd each looked-up connection's socket is on, by peer; once the connection has closed,
        # that fd goes to its process's vacated ones: the kernel gives a new socket the lowest free
        # fd, so a client with several connections in flight opens its next on a vacated one,
        # which no scan has passed (16 parallel curl transfers: a quarter of the lookups listed the
        # fd table and read half of it). Hints as above; each vacated fd is tried once.
        self._held: dict[str, tuple[int, str]] = {}
        self._vacated: dict[int, dict[str, None]] = {}
        self._forgotten: dict[str, tuple[int, str]] = {}  # the last vacated, by peer
        # (host pid, which file) -> its open descriptor. Unlike the hints above, these are used and
        # closed under a lock: a descriptor closed by one thread while another reads it could be
        # reused by an unrelated open in between.
        self._files: dict[tuple[int, int], int] = {}
        self._files_lock = threading.Lock()
        self._closed = False
        self._warned_at = -10.0  # when a walk cut at MAX_PROCESSES was last said (rate-limited)
        self._built: dict[tuple[bool, tuple[ProcEntry, ...], tuple[ProcEntry, ...]], Any] = {}
        try:  # /proc/loadavg, kept open: one pread per lookup (none: every lookup walks)
            self._counter_fd: int | None = os.open(f"{proc}/loadavg", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._counter_fd = None

    def warm(self) -> None:
        """What the first lookup would do first that depends on no process: done ahead of it."""
        warm_argv()

    def attribute(
        self, peer: str, *, every_owner: bool = False, identity: bool = True
    ) -> Attribution | None:
        """The owner of the client socket whose address is ``peer`` (``host:port``), or None when it
        cannot be found (the socket closed, the owner exited, /proc unreadable).

        The newest processes are searched first and the search stops at the first owner, unless
        ``every_owner`` (what a rule bound to executables needs: ``complete`` says it was done).
        Without ``identity`` the executables' file identities are not read (``exe_ids`` is empty,
        which a rule bound to executables refuses): for a lookup whose answer is evidence only."""
        try:
            census = self._walk() if every_owner else self._kept() or self._walk()
            if every_owner and census.truncated:
                # The first owner the walk found, for the evidence: not ``complete``, so a rule
                # bound to executables refuses (an owner may be among the processes not walked).
                self._truncated(peer)
                every_owner = False
            found = self._attribute(peer, census, every_owner, identity=identity or every_owner)
        except (OSError, ValueError):
            log.debug("attribution of %s failed", peer, exc_info=True)
            found = None
        return found

    def _truncated(self, peer: str) -> None:
        now = time.monotonic()
        if now - self._warned_at >= 10:
            self._warned_at = now
            log.warning(
                "the sandbox has more than %d processes: the owners of %s (and of its other "
                "connections, said at most every 10 s) cannot all be found, so no rule bound to "
                "executables lets them through",
                MAX_PROCESSES,
                peer,
            )

    def attribute_now(self, peer: str, *, identity: bool = True) -> Attribution | None:
        """``attribute(peer)`` when it needs no walk of the process tree (a kept census of at most
        INLINE_PROCESSES processes): a few system calls, cheaper on the caller's thread than a
        hand-off to a worker. Raises BlockingIOError when it would walk: call ``attribute`` in a
        worker thread instead."""
        census = self._kept()
        if census is None or len(census.pids) > INLINE_PROCESSES:
            raise BlockingIOError("the sandbox's process tree must be walked")
        try:
            return self._attribute(peer, census, False, INLINE_FDS, identity=identity)
        except BlockingIOError:
            raise
        except (OSError, ValueError):
            log.debug("attribution of %s failed", peer, exc_info=True)
            return None

    def remember(self, peer: str, found: Any, owner: object = None) -> None:
        """``found`` (None: not found) is the process of ``owner``, a connection from ``peer``,
        until :meth:`forget` says it closed."""
        with self._lock:
            others = tuple(entry for entry in self._known.get(peer, ()) if entry[0] is not owner)
            _put(self._known, peer, (*others, (owner, found)), KNOWN_PEERS)
        # Remembered again just after it was forgotten: the connection lives on (the front end
        # handed it to mitmproxy's layers), so its fd is not vacated.
        held = self._forgotten.pop(peer, None)
        if held is not None:
            vacated = self._vacated.get(held[0])
            if vacated is not None:
                vacated.pop(held[1], None)
            self._held[peer] = held

    def known(self, peer: str | None) -> Attribution | None:
        """The process of the one open connection from ``peer``; None when there is none, or more
        than one (which of them a decision from that address is, the address cannot tell)."""
        entries = self._known.get(peer) if peer is not None else None
        return entries[0][1] if entries is not None and len(entries) == 1 else None

    def forget(self, peer: str | None, owner: object = None) -> None:
        """``owner``, the connection from ``peer``, has closed: its process is no longer known by
        that address, and the fd its socket was on is a likely place for the process's next one."""
        if peer is not None:
            with self._lock:
                rest = tuple(entry for entry in self._known.get(peer, ()) if entry[0] is not owner)
                if rest:
                    self._known[peer] = rest
                else:
                    self._known.pop(peer, None)
            held = self._held.pop(peer, None)
            if held is not None:
                pid, fd = held
                vacated = self._vacated.get(pid)
                if vacated is None:
                    vacated = _put(self._vacated, pid, {}, MAX_PROCESSES)
                if len(vacated) >= VACATED_FDS:
                    # The oldest, from a copy: the lookup thread may take from it meanwhile.
                    for oldest in list(vacated)[:1]:
                        vacated.pop(oldest, None)
                vacated[fd] = None
                _put(self._forgotten, peer, held, SEEN_SOCKETS)

    def _attribute(
        self,
        peer: str,
        census: Census,
        every_owner: bool,
        fds: int | None = None,
        *,
        identity: bool = True,
    ) -> Attribution | None:
        """The search itself; with ``fds``, BlockingIOError once more fd table entries than that
        would be read (a process with a huge fd table is searched off the event loop). Parents are
        the walk's while they live (one system call fewer per process), else read afresh."""
        tree = census.parents
        host, _, port = peer.rpartition(":")
        local = (host.strip("[]"), int(port))
        inode = self._inode(local)
        if inode is None:
            return None
        link = f"socket:[{inode}]"
        owners: list[ProcEntry] = []
        entries: dict[int, ProcEntry] = {}
        budget = [fds]
        for pid in census.pids:
            task = None
            fd = self._owns(pid, link, budget)
            if not fd:
                # A thread's own file table (a clone without CLONE_FILES, or a leader that has
                # exited): /proc/PID/fd shows only the leader's. Searched for every owner; and
                # for the first when the leader's table is empty, as it is once the leader thread
                # has ended (a process could otherwise keep its connections unnamed). Never on
                # the event loop: the threads' tables are the process's to make large.
                task = None
                if every_owner or fd == "":
                    if not every_owner and budget[0] is not None:
                        raise BlockingIOError(f"the threads of {pid} must be searched")
                    limit = None if every_owner else MAX_THREAD_READS
                    task = _thread_holding(f"{self.proc}/{pid}", pid, link, limit)
                if task is None:
                    continue
                fd = None
            entry = self._entry(pid, census.sandbox_pids, tree, task, identity=identity)
            if entry is None:
                if every_owner:  # an owner whose executable cannot be read: nobody is vouched for
                    return None
                continue
            owners.append(entry)
            if fd and len(owners) == 1:
                _put(self._held, peer, (pid, fd), SEEN_SOCKETS * 16)
            if not every_owner:
                break
        if not owners:
            return None
        try:
            for owner in owners:
                self._ancestors(owner, entries, census.sandbox_pids, tree)
        except _ParentGone:
            # A parent the walk found cannot be read: it may have exited and its child been
            # adopted. Every parent is read afresh, the owners' from stat; the search stands.
            owners = self._with_parents_read(owners, census.sandbox_pids, every_owner)
            if not owners:
                return None
            entries = {}
            for owner in owners:
                self._ancestors(owner, entries, census.sandbox_pids, None)
        # The same processes read the same as last time (a client's next connection): the same
        # attribution, without building it again. Keyed by everything it is built from.
        key = (every_owner, tuple(owners), tuple(entries.values()))
        found = self._built.get(key)
        if found is None:
            found = build(owners, entries, complete=every_owner)
            _put(self._built, key, found, KEPT_BUILT)
        return found

    def _kept(self) -> Census | None:
        """The last walk, while no pid has been allocated on the host since it began."""
        census = self._census
        if census is None or time.monotonic() - census.taken > CENSUS_AGE:
            return None
        return census if self._counter() == census.counter else None

    def _walk(self) -> Census:
        """A new walk of the tree (kept for later lookups when the pid counter is readable). The
        counter is read first: a process created during the walk moves it past the one recorded."""
        counter, taken = self._counter(), time.monotonic()
        parents: dict[int, int] = {}
        found, truncated = self._descendants(parents)
        census = Census(counter, taken, tuple(sorted(found, reverse=True)), {}, parents, truncated)
        self._census = census if counter else None
        self._close_files(keep=frozenset(census.pids))
        return census

    def _counter(self) -> bytes:
        """The last pid the kernel allocated in the gate's PID namespace, or b"" when unknown."""
        fd = self._counter_fd  # read once: close() may clear it meanwhile
        if fd is None:
            return b""
        try:
            fields = os.pread(fd, 128, 0).split()
        except OSError:
            return b""
        return fields[4] if len(fields) == 5 else b""

    def close(self) -> None:
        """Releases the kept descriptors: ``/proc/loadavg`` (later lookups walk every time) and the
        processes' files (later reads are by path). Never waits: files another thread is reading
        through are closed by it as it finishes. Call it once the sandbox's lookups are no longer
        needed (a lookup still under way then may find its process unknown)."""
        fd, self._counter_fd = self._counter_fd, None
        if fd is not None:
            os.close(fd)
        self._closed = True
        self._close_files()

    def _proc_file(self, pid: int, which: int) -> bytes:
        """``/proc/<pid>/stat`` or ``cmdline`` as it is now, through a kept descriptor (opened on
        first use). OSError when the process is gone."""
        path = f"{self.proc}/{pid}/{_KEPT_NAMES[which]}"
        limit = _KEPT_LIMITS[which]
        if self._closed or not self._files_lock.acquire(blocking=False):
            return _read(path, limit, missing_ok=False)
        try:
            key = (pid, which)
            fd = self._files.get(key)
            if fd is not None:
                try:
                    return os.pread(fd, limit, 0)
                except OSError:  # reaped since (ESRCH): the number may be another process's now
                    del self._files[key]
                    os.close(fd)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                data = os.pread(fd, limit, 0)
            except OSError:
                os.close(fd)
                raise
            if len(self._files) >= KEPT_FILES:
                os.close(self._files.pop(next(iter(self._files))))
            self._files[key] = fd
            return data
        finally:
            if self._closed:
                self._close_all_files()
            self._files_lock.release()
            if self._closed and self._files:  # close() came between the check and the release
                self._close_files()

    def _close_files(self, keep: frozenset[int] = frozenset()) -> None:
        """Closes the kept files of every process not in ``keep`` (a new walk keeps those of the
        processes it still found); when another thread is reading through them, nothing now (it
        closes them all itself after :meth:`close`)."""
        if not self._files_lock.acquire(blocking=False):
            return
        try:
            if self._closed:
                self._close_all_files()
            else:
                for key in [key for key in self._files if key[0] not in keep]:
                    os.close(self._files.pop(key))
        finally:
            self._files_lock.release()

    def _close_all_files(self) -> None:
        """Under the files lock."""
        while self._files:
            os.close(self._files.popitem()[1])

    def _inode(self, local: tuple[str, int]) -> int | None:
        """The client socket's inode: an exact lookup through sock_diag when the sandbox handed
        over its netlink socket, else a scan of the sandbox's TCP table."""
        if self.diag is not None:
            with self._diag_lock:  # one request and its answer at a time on the one socket
                try:
                    return self.diag.inode(local, self.gate)
                except DiagUnavailable:
                    log.warning("sock_diag unavailable; reading the TCP table instead")
                    self.diag = None
        name = "tcp6" if ":" in local[0] else "tcp"
        with open(f"{self.proc}/{self.root}/net/{name}", encoding="ascii") as table:
            return find_inode(table.read().splitlines(), local, self.gate)

    def _descendants(self, parents: dict[int, int]) -> tuple[list[int], bool]:
        """The helper's descendants, and whether the walk stopped at MAX_PROCESSES with processes
        left unvisited (the sandbox chooses which: it can fork past the bound before it hands a
        socket on); ``parents`` is given each one's parent as listed."""
        queue = [self.root]
        found: list[int] = []
        while queue:
            if len(found) + 1 >= MAX_PROCESSES:  # (the helper counts as one)
                return found, True
            pid = queue.pop()
            if pid != self.root:
                found.append(pid)
            children, leaders = self._children(pid)
            # The leader thread's own children only: ``/proc/PID/exe`` reads the leader's memory,
            # which it lets go of before it hands its children on, so while it reads they are still
            # its children. A child of another thread is adopted as soon as no thread of PID is
            # left that is not exiting, which can come well before the leader lets go of its
            # memory: its parent is always read from stat.
            for child in leaders:
                parents[child] = pid
            queue.extend(children)
        return found, False

    def _children(self, pid: int) -> tuple[list[int], list[int]]:
        """Children of every thread of ``pid`` (a child is listed under the thread that forked it),
        and those listed under the leader thread. ``task``'s link count is 2 + threads: a
        single-threaded process needs one read."""
        base = f"{self.proc}/{pid}/task"
        try:
            tids = [str(pid)] if os.stat(base).st_nlink <= 3 else os.listdir(base)
        except OSError:
            return [], []
        found: list[int] = []
        leaders: list[int] = []
        for tid in tids:
            data = _read(f"{base}/{tid}/children")
            if data:
                listed = [int(c) for c in data.split()]
                found.extend(listed)
                if tid == str(pid):
                    leaders = listed
        return found, leaders

    def _owns(self, pid: int, link: str, budget: list[int | None]) -> str | None:
        """The fd ``pid`` holds ``link`` on; None when it holds none, "" when its table is empty
        and its leader thread has ended (see the caller). Looked for on the fd an earlier scan
        saw it on first, then the fd its last looked-up socket was on, then the lowest of the fds
        its closed connections vacated, then its fd table, highest first (a socket just connected
        is usually the newest descriptor of its process). Each hint is only a place to look: the
        readlink decides. ``budget[0]``, when set, is what is left of the fd entries the caller
        allows (BlockingIOError past it)."""
        base = f"{self.proc}/{pid}/fd"
        seen = self._seen.get(link)
        first = seen[1] if seen is not None and seen[0] == pid else None
        hint = self._last_fd.get(pid)
        for where in (first, hint if hint != first else None):
            if where is not None:
                try:
                    if os.readlink(f"{base}/{where}") == link:
                        if where == first:
                            self._seen.pop(link, None)  # looked up: not looked for again
                        return where
                except OSError:
                    pass
        vacated = self._vacated.get(pid)
        if vacated:
            for fd in sorted(list(vacated), key=_number)[:VACATED_TRIES]:
                vacated.pop(fd, None)  # tried once: whatever it holds now is read here
                if fd in (first, hint):
                    continue
                try:
                    read = os.readlink(f"{base}/{fd}")
                except OSError:
                    continue
                if read == link:
                    return fd
                if read.startswith("socket:"):
                    self._pass(read, pid, fd)
        try:
            fds = sorted(os.listdir(base), key=_number, reverse=True)
        except (OSError, ValueError):
            self._vacated.pop(pid, None)  # (gone: nothing of it is a hint any more)
            return None
        if not fds:
            # Empty: a process that holds nothing, a zombie, or one whose leader thread has ended
            # while others run (its table went with it, and its executable no longer reads).
            try:
                os.readlink(f"{self.proc}/{pid}/exe")
            except OSError:
                try:  # threads besides the leader ("task" links: 2 + threads)
                    if os.stat(f"{self.proc}/{pid}/task").st_nlink > 3:
                        return ""
                except OSError:
                    pass
            return None
        left = budget[0]
        if left is not None:
            if len(fds) > left:
                raise BlockingIOError(f"{base} holds too many fds to read on the event loop")
            budget[0] = left - len(fds)
        for fd in fds:  # the hinted fds too: the socket may have been moved onto one since
            try:
                read = os.readlink(f"{base}/{fd}")
            except OSError:
                continue
            if read == link:
                _put(self._last_fd, pid, fd, MAX_PROCESSES)
                return fd
            if read.startswith("socket:"):
                self._pass(read, pid, fd)
        return None

    def _pass(self, link: str, pid: int, fd: str) -> None:
        """A socket read on the way to another: where its own lookup reads first."""
        _put(self._seen, link, (pid, fd), SEEN_SOCKETS)

    def _with_parents_read(
        self, owners: list[ProcEntry], sandbox_pids: dict[int, int], every_owner: bool
    ) -> list[ProcEntry]:
        """``owners`` with their parents as ``/proc`` says now; one that cannot be read is left out
        (or, for a search of every owner, none is left: nobody is vouched for)."""
        fresh: list[ProcEntry] = []
        for owner in owners:
            pid = owner.host_pid
            try:
                ppid, _ = self._pids(f"{self.proc}/{pid}", sandbox_pids, pid, None)
            except (OSError, ValueError):
                if every_owner:
                    return []
                continue
            fresh.append(dataclasses.replace(owner, host_ppid=ppid))
        return fresh

    def _ancestors(
        self,
        entry: ProcEntry,
        entries: dict[int, ProcEntry],
        sandbox_pids: dict[int, int],
        tree: dict[int, int] | None,
    ) -> None:
        """``entry``'s parents into ``entries``. With ``tree`` (parents as the walk found them),
        _ParentGone when one of them cannot be read: it may have exited, its child adopted."""
        entries[entry.host_pid] = entry
        current = entry
        for _ in range(64):
            if current.pid == 1 or current.host_ppid == self.root:
                return
            parent = entries.get(current.host_ppid) or self._parent(
                current.host_ppid, sandbox_pids, tree
            )
            if parent is None:
                if tree is not None:
                    raise _ParentGone()
                return
            entries[parent.host_pid] = parent
            current = parent

    def _parent(
        self, pid: int, sandbox_pids: dict[int, int], tree: dict[int, int] | None
    ) -> ProcEntry | None:
        """A parent as the chain records it: its pids and executable path (``"PID EXE"``); its
        command line and file identity are only ever read for a socket's owners. The sandbox's init
        is read once: a chain stops at it and records none of it but its pid inside, 1."""
        init = self._init
        if init is not None and init.host_pid == pid:
            return init
        base = f"{self.proc}/{pid}"
        try:
            ppid, nspid = self._pids(base, sandbox_pids, pid, tree)
        except OSError:
            return None
        try:
            exe = os.readlink(f"{base}/exe")  # (and so it lives: a parent the walk found is it)
        except OSError:
            # Read afresh, a parent whose leader thread has ended while another runs is named by
            # that thread's executable (the same memory); the walk's is confirmed by its leader.
            found = None if tree is not None else _thread_exe(base, pid)
            if found is None:
                return None
            exe = found
        entry = ProcEntry(pid, ppid, nspid, exe, ())
        if nspid == 1 and ppid == self.root:
            self._init = entry
        return entry

    def _entry(
        self,
        pid: int,
        sandbox_pids: dict[int, int],
        tree: dict[int, int] | None,
        task: str | None = None,
        *,
        identity: bool = True,
    ) -> ProcEntry | None:
        """The owner ``pid``; ``task``: the directory of the thread whose file table holds the
        socket, whose executable is read (a leader that has exited has none to read); the
        executable's file identity only with ``identity``."""
        base = f"{self.proc}/{pid}"
        where = task or base
        try:
            ppid, nspid = self._pids(base, sandbox_pids, pid, tree)
            exe = os.readlink(f"{where}/exe")
            exe_id = None
            if identity:
                st = os.stat(f"{where}/exe")
                exe_id = (st.st_dev, st.st_ino)
            raw = self._proc_file(pid, _CMDLINE)
        except OSError:
            return None
        return ProcEntry(pid, ppid, nspid, exe, _argv(raw), exe_id)

    def _pids(
        self, base: str, sandbox_pids: dict[int, int], pid: int, tree: dict[int, int] | None
    ) -> tuple[int, int]:
        """(parent's host pid, pid in the sandbox): the sandbox pid from ``status`` once per
        process and census; the parent from ``tree`` (the walk's, which the caller confirms by
        reading that parent: a process is reparented only when its parent exits), else read afresh
        (``stat``, which has the parent, is the cheaper file, and is kept open)."""
        nspid = sandbox_pids.get(pid)
        if nspid is None:
            ppid, nspid = _status(base)
            sandbox_pids[pid] = nspid
            return ppid, nspid
        if tree is not None:
            listed = tree.get(pid)
            if listed is not None:
                return listed, nspid
        return _stat_ppid(self._proc_file(pid, _STAT), base), nspid


_KCMP = {"x86_64": 312, "aarch64": 272, "riscv64": 272}.get(os.uname().machine)
_KCMP_FILES = 2
_kcmp: Any = None
_kcmp_refused = threading.Event()


def _same_files(pid: int, tid: int) -> bool:
    """Whether thread ``tid`` shares the file table of ``pid`` (``kcmp(KCMP_FILES)``); False when
    that cannot be told (no kcmp: every thread's table is then read)."""
    global _kcmp
    if _KCMP is None:
        return False
    if _kcmp is None:
        import ctypes

        _kcmp = ctypes.CDLL(None, use_errno=True).syscall
    if _kcmp(_KCMP, pid, tid, _KCMP_FILES, 0, 0) == 0:
        return True
    import ctypes

    if ctypes.get_errno() in (errno.EPERM, errno.ENOSYS) and not _kcmp_refused.is_set():
        _kcmp_refused.set()  # said once: a seccomp filter (a container's default) refuses kcmp
        log.warning(
            "kcmp is refused here (%s): a search for every owner of a socket (rules bound to "
            "executables) reads the file table of every thread of the sandbox's processes",
            os.strerror(ctypes.get_errno()),
        )
    return False


def _put[K, V](table: dict[K, V], key: K, value: V, limit: int) -> V:
    """``table[key] = value``, the table emptied first once it holds ``limit`` entries, bounded
    however many processes, sockets and connections a sandbox makes. Every table here but
    ``_known`` is a hint or a cache (losing it costs reads, never an answer); ``_known`` holds one
    entry per open connection that was looked up (a close removes it, a late lookup is never
    kept), so its bound, far above any connection cap, is a last guard that open connections do
    not reach."""
    if len(table) >= limit:
        table.clear()
    table[key] = value
    return value


def _thread_exe(base: str, pid: int) -> str | None:
    """The executable of a running thread of ``pid`` other than its leader (threads share their
    memory, which ``exe`` reads), or None: a process whose leader thread has ended. At most
    MAX_THREAD_READS threads are tried, and the task directory is read no further."""
    try:
        with os.scandir(f"{base}/task") as entries:
            tids = [entry.name for entry in itertools.islice(entries, MAX_THREAD_READS + 1)]
    except OSError:
        return None
    for tid in [t for t in tids if t != str(pid)][:MAX_THREAD_READS]:
        try:
            return os.readlink(f"{base}/task/{tid}/exe")
        except OSError:
            continue
    return None


def _thread_holding(base: str, pid: int, link: str, limit: int | None = None) -> str | None:
    """The task directory of a thread of ``pid`` (not the leader, whose table ``/proc/PID/fd``
    is) whose own file table links to ``link``, or None. A process can keep a socket out of
    ``/proc/PID/fd`` by holding it only in a thread cloned without ``CLONE_FILES`` (and pass the
    socket, or have it inherited, to a bound program that never writes to it), or by ending its
    leader thread: what a rule bound to executables checks must see those holders too. A table
    several threads share is read once; ``limit``: at most that many tables, and none with more
    than INLINE_FDS entries (a lookup that only names the process: it gives up past them)."""
    try:
        tids = os.listdir(f"{base}/task")
    except OSError:
        return None
    read: list[int] = []  # a thread of each table read
    for tid in tids:
        if tid == str(pid) or _same_files(pid, int(tid)):
            continue  # the leader's table (/proc/PID/fd), searched already
        if any(_same_files(other, int(tid)) for other in read):
            continue  # a table read already, through another thread
        if limit is not None and len(read) >= limit:
            return None
        read.append(int(tid))
        fd_dir = f"{base}/task/{tid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        if limit is not None and len(fds) > INLINE_FDS:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") == link:
                    return f"{base}/task/{tid}"
            except OSError:
                continue
    return None


def _read(path: str, limit: int = 65536, *, missing_ok: bool = True) -> bytes:
    """A small /proc file's bytes (b"" when it is gone, unless ``missing_ok`` is False): raw os
    calls, no buffered file object (this runs several times per connection). One read: procfs
    hands over up to ``limit`` bytes of these files in a single call."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        if missing_ok:
            return b""
        raise
    try:
        return os.read(fd, limit)
    except OSError:
        if missing_ok:
            return b""
        raise
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=256)
def _argv(raw: bytes) -> tuple[str, ...]:
    """A command line as recorded: scrubbed once per distinct command line (the same shell is the
    parent of many connections' processes)."""
    argv = [a.decode("utf-8", "backslashreplace") for a in raw.split(b"\0")]
    if argv and argv[-1] == "":
        argv.pop()
    return scrub_argv(argv)


def _number(name: str) -> int:
    return int(name)


def _stat_ppid(data: bytes, base: str) -> int:
    """The parent's pid from ``stat`` (the field after the state, which follows the command name in
    parentheses: the name may hold spaces and parentheses, so the last ")" ends it)."""
    fields = data[data.rfind(b")") + 1 :].split()
    if len(fields) < 2:
        raise ValueError(f"{base}/stat has no parent pid")
    return int(fields[1])


def _status(base: str) -> tuple[int, int]:
    """(PPid, the pid in the innermost PID namespace) from ``status``."""
    data = _read(f"{base}/status", missing_ok=False)
    ppid = _field(data, b"\nPPid:")
    nspid = _field(data, b"\nNSpid:", last=True)
    if ppid is None or nspid is None:
        raise ValueError(f"{base}/status has no PPid or NSpid")
    return ppid, nspid


def _field(data: bytes, name: bytes, *, last: bool = False) -> int | None:
    """The (first or last) number on a ``status`` line, or None when the line is missing."""
    start = data.find(name)
    if start < 0:
        return None
    end = data.find(b"\n", start + 1)
    values = data[start + len(name) : end if end >= 0 else len(data)].split()
    if not values:
        return None
    try:
        return int(values[-1] if last else values[0])
    except ValueError:
        return None
