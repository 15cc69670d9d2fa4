"""Live reload: watch every file the policy in force came from, reload on change or SIGHUP.

Watched: each policy's files (the top file by its path, so a ConfigMap's ``..data`` swap or an editor's
rename is seen, and every include both as loaded and as named, so an include's symlink re-pointed at
another file is seen too), the managed policy, the approvals overlay and the hosts
file. A change is loaded and validated completely off the event loop (a 10,000-rule policy takes
a while to compile), then swapped in with one assignment on the loop, so every request sees either the
old policy or the new one. A refused reload keeps the last good policy and is reported four ways: the
log (file:line: rule: problem), an ``egress.policy.reload`` event with ``result: error`` in the decision
stream and journal, ``egress_policy_reload_failures_total``, and ``/healthz`` saying ``stale``.
Reloads are serialised: a change seen during a reload is picked up by the next poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from proxy.evidence.record import Event, policy_reload
from proxy.policy.model import Policy
from proxy.policy.reload import Changes, PolicyHolder
from proxy.policy.watch import DEFAULT_INTERVAL, Watcher, watch

log = logging.getLogger("egress")

EventSink = Callable[[str, dict[str, Any]], None]
Installed = Callable[[str | None, Policy], Awaitable[None]]


class LiveReload:
    """Reloads ``holders`` (None: the gate's policy; else a sandbox id) and reports each outcome."""

    def __init__(
        self,
        holders: dict[str | None, PolicyHolder],
        *,
        event: EventSink,
        extra_paths: Callable[[], Iterable[Path]] = lambda: (),
        on_change: Callable[[], None] | None = None,
        installed: Installed | None = None,
        interval: float = DEFAULT_INTERVAL,
        sandbox_outcome: Callable[[str, PolicyHolder], None] | None = None,
    ) -> None:
        self.holders = holders
        self._event = event
        self._extra = extra_paths
        self._on_change = on_change  # e.g. re-read the approvals overlay
        self.installed = installed  # e.g. close tunnels the new policy no longer allows
        self.interval = interval
        self._sandbox_outcome = (
            sandbox_outcome  # metrics for sandbox policies (no on_reload of theirs)
        )
        self._lock = asyncio.Lock()
        self.reloads = 0
        self.watcher = Watcher(self.paths)

    def paths(self) -> list[Path]:
        out: dict[str, Path] = {}
        for holder in self.holders.values():
            out[str(holder.path)] = Path(holder.path)
            for extra in getattr(holder, "watched", ()):
                out[str(extra)] = Path(extra)
            policy = holder()
            for file in (*policy.files, *policy.named):
                out[str(file)] = file
        for path in self._extra():
            out[str(path)] = Path(path)
        return list(out.values())

    async def reload(self, trigger: str) -> None:
        async with self._lock:
            self.reloads += 1
            if self._on_change is not None:
                try:
                    self._on_change()
                except Exception:
                    log.exception("reload side step failed")
            for key, holder in self.holders.items():
                await self._reload_one(key, holder, trigger)

    async def _reload_one(self, key: str | None, holder: PolicyHolder, trigger: str) -> None:
        started = time.monotonic()

        def prepare() -> tuple[Policy, Changes]:
            new = holder.prepare()
            return new, holder.changes(new)

        try:
            new, changes = await asyncio.to_thread(prepare)
        except Exception as exc:
            holder.refused(exc, time.monotonic() - started)
            self._report(key, holder, trigger)
            return
        if new.version == holder().version and not holder.stale:
            return  # a watched file was touched, nothing the policy reads changed
        # Only this runs on the loop; reloads are serialised, so ``changes`` is still current.
        holder.install(new, time.monotonic() - started, changes)
        self._report(key, holder, trigger)
        if self.installed is not None:
            try:
                await self.installed(key, new)
            except Exception:
                log.exception("after-reload step failed")

    def _report(self, key: str | None, holder: PolicyHolder, trigger: str) -> None:
        done = holder.last_reload
        if done is None:
            return
        if key is not None and self._sandbox_outcome is not None:
            try:
                self._sandbox_outcome(key, holder)
            except Exception:
                log.exception("reload metrics failed")
        files = [str(f) for f in holder().files] or [str(holder.path)]
        event: Event = policy_reload(done, trigger=trigger, files=files, sandbox_id=key)
        try:
            self._event(event.name, event.fields)
        except Exception:
            log.exception("reload event failed")

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``/healthz``: healthy unless a refused reload left some policy stale."""
        stale: list[dict[str, Any]] = []
        for key, holder in self.holders.items():
            if holder.stale and holder.last_reload is not None:
                entry: dict[str, Any] = {
                    "policy": str(holder.path),
                    "version_in_force": holder().version,
                    "problems": list(holder.last_reload.problems),
                    "since": holder.last_reload.at,
                }
                if key is not None:
                    entry["sandbox_id"] = key
                stale.append(entry)
        main = self.holders.get(None)
        details: dict[str, Any] = {}
        if main is not None:
            details["policy_version"] = main().version
        if stale:
            details["stale"] = stale
        return not stale, details

    async def run(self, stop: asyncio.Event) -> None:
        async def changed() -> None:
            await self.reload("file-change")

        await watch(self.watcher, changed, interval=self.interval, stop=stop)
