"""Names from a hosts file (``/etc/hosts``), consulted before DNS as every resolver on the host does.

Containers get names this way (Compose ``extra_hosts``, Kubernetes ``hostAliases``, an internal mirror's
entry), and ``localhost`` lives here. A name found in the file is answered from the file alone, both
address families, and never asked of DNS: the file is the authority for it, as with glibc's
``hosts: files dns``. What it returns is screened and pinned like any DNS answer, so an entry that maps
an allowed name to an internal address is refused unless the policy opens that range.

The file is re-read when it changes (containers rewrite it at start): its identity (inode, size,
modification time) is checked at most once per ``recheck`` seconds. A file that cannot be read counts
as empty, logged once per change: no names from it, so nothing is allowed that DNS would not answer.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from proxy.core.hosts import InvalidHost, canonical_host

log = logging.getLogger(__name__)

DEFAULT_HOSTS_FILE = "/etc/hosts"
MAX_HOSTS_FILE = 4 * 1024 * 1024  # a hosts file larger than this is not one; read no more of it

Entries = dict[str, tuple[tuple[str, ...], tuple[str, ...]]]  # name -> (IPv4, IPv6) addresses


def parse_hosts(text: str) -> Entries:
    """``address name [alias...]`` lines; comments and entries that do not parse are skipped."""
    v4: dict[str, list[str]] = {}
    v6: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            address = ipaddress.ip_address(fields[0].split("%", 1)[0])
        except ValueError:
            continue
        table = v4 if address.version == 4 else v6
        for raw in fields[1:]:
            try:
                name = canonical_host(raw)
            except InvalidHost:
                continue
            if not isinstance(name, str):
                continue  # an address in the name column names nothing
            bucket = table.setdefault(name, [])
            if str(address) not in bucket:
                bucket.append(str(address))
    return {name: (tuple(v4.get(name, ())), tuple(v6.get(name, ()))) for name in {*v4, *v6}}


class HostsFile:
    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_HOSTS_FILE,
        *,
        recheck: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self.recheck = recheck
        self._clock = clock
        self._entries: Entries = {}
        self._identity: tuple[int, int, int] | None = None
        self._checked = float("-inf")
        self._refresh()

    def lookup(self, name: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """(IPv4, IPv6) addresses for a canonical name, or None when the file does not name it."""
        now = self._clock()
        if now - self._checked >= self.recheck:
            self._refresh()
        return self._entries.get(name)

    def _refresh(self) -> None:
        self._checked = self._clock()
        try:
            st = self.path.stat()
        except OSError as exc:
            if self._identity != (0, 0, 0):
                log.warning("hosts file %s is unreadable (%s): no names from it", self.path, exc)
            self._identity = (0, 0, 0)
            self._entries = {}
            return
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        if identity == self._identity:
            return
        self._identity = identity
        try:
            with self.path.open("rb") as handle:
                text = handle.read(MAX_HOSTS_FILE).decode("utf-8", "replace")
        except OSError as exc:
            log.warning("hosts file %s is unreadable (%s): no names from it", self.path, exc)
            self._entries = {}
            return
        self._entries = parse_hosts(text)
        log.info("hosts file %s: %d names", self.path, len(self._entries))


__all__ = ["DEFAULT_HOSTS_FILE", "HostsFile", "parse_hosts"]
