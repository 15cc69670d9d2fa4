"""The shared store for replicas: Redis (or Valkey) through the maintained ``redis`` asyncio client.

Every transition is one Lua script, so it is atomic on the server whichever replica runs it: open-or-join
with the pending limits, and compare-and-set answers (on a per-approval version, so an answer, the
timeout and the reviewer's advice can never overwrite each other). Each change is published on one
channel; every replica relays what it hears to its local :class:`~proxy.approvals.store.Feed`, which
wakes held requests at once (the broker still re-reads the store every second, so a message lost in a
reconnect delays an answer by at most that). Session grants are keys with a TTL, seen by every replica.

Deadlines use the replicas' clocks (keep them in NTP sync). Keys name their own slots, so this needs a
single primary (with replicas or Sentinel), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from proxy.approvals.model import (
    ENDED,
    ENDED_REASON,
    Advice,
    Approval,
    Grant,
    NotOpen,
    Scope,
    State,
    Subject,
    clip,
)
from proxy.approvals.store import Change, ChangeType, Feed, Limits, shown_state

log = logging.getLogger(__name__)

PREFIX = "egress:approvals"
KEEP_DECIDED = 24 * 3600
RETRIES = 5  # compare-and-set attempts when another writer changed an approval in between

_OPEN = """
local P, now, id, deadline = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local per_sandbox, total, data, sandbox = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7], ARGV[8]
local skey, keep, message = ARGV[9], tonumber(ARGV[10]), ARGV[11]
local existing = redis.call('GET', P .. ':join:' .. skey)
if existing then
  local h = redis.call('HMGET', P .. ':a:' .. existing, 'state', 'deadline', 'data')
  if h[1] == 'pending' and tonumber(h[2]) > now then
    return {0, h[3]}
  end
end
redis.call('ZREMRANGEBYSCORE', P .. ':open', '-inf', now)
redis.call('ZREMRANGEBYSCORE', P .. ':open:' .. sandbox, '-inf', now)
if redis.call('ZCARD', P .. ':open:' .. sandbox) >= per_sandbox
    or redis.call('ZCARD', P .. ':open') >= total then
  return {2, ''}
end
local key = P .. ':a:' .. id
redis.call('HSET', key, 'state', 'pending', 'deadline', ARGV[4], 'sandbox', sandbox,
  'skey', skey, 'data', data, 'ver', 1)
redis.call('EXPIREAT', key, math.ceil(deadline + keep))
redis.call('ZADD', P .. ':open', deadline, id)
redis.call('ZADD', P .. ':open:' .. sandbox, deadline, id)
redis.call('SET', P .. ':join:' .. skey, id, 'PXAT', math.ceil(deadline * 1000))
redis.call('PUBLISH', P .. ':changes', message)
return {1, data}
"""

# ARGV: prefix, id, expected version, new state, new data, message, now, require_open,
#       grant key, grant data, grant expiry (ms, absolute), grant set key
_SET = """
local P, id, ver, state, data, message = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local now, require_open = tonumber(ARGV[7]), ARGV[8]
local key = P .. ':a:' .. id
local h = redis.call('HMGET', key, 'ver', 'state', 'deadline', 'sandbox', 'skey')
if not h[1] then return -1 end
if h[1] ~= ver then return 0 end
if h[2] ~= 'pending' then return -2 end
if require_open == '1' and tonumber(h[3]) <= now then return -2 end
redis.call('HSET', key, 'state', state, 'data', data)
redis.call('HINCRBY', key, 'ver', 1)
if state ~= 'pending' then
  redis.call('ZREM', P .. ':open', id)
  redis.call('ZREM', P .. ':open:' .. h[4], id)
  if redis.call('GET', P .. ':join:' .. h[5]) == id then
    redis.call('DEL', P .. ':join:' .. h[5])
  end
end
if ARGV[9] ~= '' then
  redis.call('SET', ARGV[9], ARGV[10], 'PXAT', ARGV[11])
  redis.call('SADD', ARGV[12], ARGV[9])
  local left = redis.call('PTTL', ARGV[12])
  if left < 0 or now * 1000 + left < tonumber(ARGV[11]) then
    redis.call('PEXPIREAT', ARGV[12], ARGV[11])  -- never shorter than a grant it lists
  end
end
redis.call('PUBLISH', P .. ':changes', message)
return 1
"""

# ARGV: prefix, sandbox, now, decided_by, reason. The sandbox ended, in one step: its pending
# approvals expire (an answer another replica gives after this finds nothing open), then its grants
# and its grant list go (none can be written for it in between: only an answer writes one).
_END = """
local P, sandbox, now, by, reason = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local ids = redis.call('ZRANGE', P .. ':open:' .. sandbox, 0, -1)
for _, id in ipairs(ids) do
  local key = P .. ':a:' .. id
  local h = redis.call('HMGET', key, 'state', 'data', 'skey')
  if h[1] == 'pending' and h[2] then
    local data = cjson.decode(h[2])
    data['state'] = 'expired'
    data['decided_by'] = by
    data['reason'] = reason
    data['decided'] = now
    redis.call('HSET', key, 'state', 'expired', 'data', cjson.encode(data))
    redis.call('HINCRBY', key, 'ver', 1)
    redis.call('ZREM', P .. ':open', id)
    if h[3] and redis.call('GET', P .. ':join:' .. h[3]) == id then
      redis.call('DEL', P .. ':join:' .. h[3])
    end
    redis.call('PUBLISH', P .. ':changes', cjson.encode({type = 'decided', approval = data}))
  end
end
redis.call('DEL', P .. ':open:' .. sandbox)
for _, grant in ipairs(redis.call('SMEMBERS', P .. ':gs:' .. sandbox)) do
  redis.call('DEL', grant)
end
redis.call('DEL', P .. ':gs:' .. sandbox)
return #ids
"""


class RedisStore:
    def __init__(
        self, url: str, *, prefix: str = PREFIX, clock: Callable[[], float] = time.time
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.clock = clock
        self.feed = Feed()
        self._client: aioredis.Redis | None = None
        self._relay: asyncio.Task[None] | None = None

    @property
    def client(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("the approval store is not started")
        return self._client

    async def start(self) -> None:
        client = aioredis.from_url(
            self.url, decode_responses=True, socket_timeout=5, socket_connect_timeout=5
        )
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            await client.aclose()  # type: ignore[no-untyped-call]
            raise RuntimeError(f"cannot reach {shown_state(self.url)}: {exc}") from None
        self._client = client
        self._open_script = client.register_script(_OPEN)
        self._set_script = client.register_script(_SET)
        self._end_script = client.register_script(_END)
        subscribed = asyncio.Event()
        self._relay = asyncio.create_task(self._relay_changes(subscribed), name="approvals-relay")
        await asyncio.wait_for(subscribed.wait(), 10)

    async def close(self) -> None:
        if self._relay is not None:
            self._relay.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._relay
            self._relay = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _relay_changes(self, subscribed: asyncio.Event) -> None:
        """Every replica's changes, from the channel into the local feed; resubscribes after a
        dropped connection (bounded backoff)."""
        delay = 0.2
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(f"{self.prefix}:changes")
                subscribed.set()
                delay = 0.2
                async for message in pubsub.listen():
                    self._publish_local(message.get("data"))
            except (RedisError, OSError) as exc:
                log.warning("approval store subscription lost (%s); resubscribing", exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _publish_local(self, data: Any) -> None:
        try:
            body = json.loads(data)
            change = Change(ChangeType(body["type"]), Approval.from_json(body["approval"]))
        except (TypeError, ValueError, KeyError) as exc:
            log.error("unreadable approval change on the channel: %s", exc)
            return
        self.feed.publish(change)

    @staticmethod
    def _message(kind: ChangeType, approval: Approval) -> str:
        return json.dumps({"type": str(kind), "approval": approval.to_json()})

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # -- approvals ----------------------------------------------------------------------------------

    async def open(self, approval: Approval, limits: Limits) -> tuple[Approval, bool] | None:
        data = json.dumps(approval.to_json())
        status, stored = await self._open_script(
            args=[
                self.prefix,
                repr(self.clock()),
                approval.id,
                repr(approval.deadline),
                limits.per_sandbox,
                limits.total,
                data,
                approval.subject.sandbox,
                approval.subject.key,
                KEEP_DECIDED,
                self._message(ChangeType.PENDING, approval),
            ]
        )
        if int(status) == 2:
            return None
        return Approval.from_json(json.loads(stored)), int(status) == 1

    async def _read(self, approval_id: str) -> tuple[Approval, str] | None:
        data, version = await self.client.hmget(self._key("a", approval_id), ["data", "ver"])
        if data is None or version is None:
            return None
        return Approval.from_json(json.loads(data)), str(version)

    async def get(self, approval_id: str) -> Approval | None:
        found = await self._read(approval_id)
        return found[0] if found else None

    async def pending(self) -> list[Approval]:
        ids = await self.client.zrangebyscore(self._key("open"), repr(self.clock()), "+inf")
        found = [await self.get(str(i)) for i in ids]
        now = self.clock()
        return sorted((a for a in found if a and a.is_open(now)), key=lambda a: a.created)

    async def _transition(
        self,
        approval_id: str,
        change: Callable[[Approval], Approval],
        kind: ChangeType,
        *,
        require_open: bool,
        grant: Grant | None = None,
    ) -> Approval:
        """Compare-and-set ``change`` onto the stored approval; NotOpen when it is not pending (or,
        with ``require_open``, past its deadline)."""
        for _ in range(RETRIES):
            found = await self._read(approval_id)
            if found is None:
                raise NotOpen(None)
            current, version = found
            if current.state is not State.PENDING:
                raise NotOpen(current)
            updated = change(current)
            grant_args: list[Any] = ["", "", 0, ""]
            if grant is not None:
                grant_args = [
                    self._key("g", grant.subject.key),
                    json.dumps(grant.to_json()),
                    int(grant.expires * 1000),
                    self._key("gs", grant.subject.sandbox),
                ]
            status = await self._set_script(
                args=[
                    self.prefix,
                    approval_id,
                    version,
                    str(updated.state),
                    json.dumps(updated.to_json()),
                    self._message(kind, updated),
                    repr(self.clock()),
                    "1" if require_open else "0",
                    *grant_args,
                ]
            )
            status = int(status)
            if status == 1:
                return updated
            if status == -1:
                raise NotOpen(None)
            if status == -2:
                raise NotOpen(await self.get(approval_id))
        raise NotOpen(await self.get(approval_id))

    async def decide(
        self,
        approval_id: str,
        state: State,
        decided_by: str,
        reason: str | None,
        scope: Scope | None,
        grant: Grant | None,
    ) -> Approval:
        now = self.clock()
        return await self._transition(
            approval_id,
            lambda a: a.decide(state, decided_by, reason, scope, now),
            ChangeType.DECIDED,
            require_open=True,
            grant=grant,
        )

    async def expire(self, approval_id: str) -> Approval | None:
        current = await self.get(approval_id)
        if current is None or current.state is not State.PENDING:
            return current
        if self.clock() < current.deadline:
            return current
        now = self.clock()
        try:
            return await self._transition(
                approval_id,
                lambda a: a.decide(State.EXPIRED, "timeout", None, None, now),
                ChangeType.DECIDED,
                require_open=False,
            )
        except NotOpen as exc:
            return exc.approval

    async def advise(self, approval_id: str, advice: Advice, reason: str | None) -> None:
        with contextlib.suppress(NotOpen):
            await self._transition(
                approval_id,
                lambda a: replace(a, advice=advice, advice_reason=clip(reason)),
                ChangeType.ADVICE,
                require_open=True,
            )

    # -- grants -------------------------------------------------------------------------------------

    async def grant_for(self, subject: Subject) -> Grant | None:
        data = await self.client.get(self._key("g", subject.key))
        if data is None:
            return None
        grant = Grant.from_json(json.loads(data))
        if grant.expires <= self.clock() or not grant.subject.covers(subject):
            return None
        return grant

    async def end_session(self, sandbox: str) -> None:
        await self._end_script(args=[self.prefix, sandbox, repr(self.clock()), ENDED, ENDED_REASON])
