"""The approvals service's own messages: the ready line and the errors that stop a gate's start-up go to
its log, so a ``--state`` URL's password never appears in them."""

from __future__ import annotations

import asyncio
import socket

import pytest

from proxy.approvals.service import Approvals, ApprovalsConfig, ApprovalsError, open_store

PASSWORD = "Sup3r-secret-pw"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("userinfo", [f":{PASSWORD}", f"gate:{PASSWORD}"])
def test_an_unreachable_store_is_named_without_its_password(userinfo: str) -> None:
    url = f"redis://{userinfo}@127.0.0.1:{_closed_port()}/0"
    approvals = Approvals(ApprovalsConfig(state=url))
    with pytest.raises(ApprovalsError) as failed:
        asyncio.run(approvals.start())
    message = str(failed.value)
    assert "the approval store" in message and "127.0.0.1" in message
    assert PASSWORD not in message


def test_the_ready_line_names_the_store_without_its_password() -> None:
    approvals = Approvals(ApprovalsConfig(state=f"rediss://:{PASSWORD}@store.test:6380/2"))
    shown = approvals.describe()["approvals"]
    assert PASSWORD not in shown
    assert shown.endswith("store.test:6380/2")


def test_a_mistyped_state_value_is_refused_without_its_password() -> None:
    with pytest.raises(ApprovalsError) as failed:
        open_store(f"redis//:{PASSWORD}@store.test:6379/0", None)
    assert PASSWORD not in str(failed.value)


@pytest.mark.parametrize(
    "spec",
    [
        f"redis://:{PASSWORD}@store.test:6379/0",
        f"rediss://gate:{PASSWORD}@[::1]:6380/2",
        f"redis://:{PASSWORD}@x@store.test/0",  # an @ in the password
        f"unix:///run/redis.sock?password={PASSWORD}",  # redis-py reads it from the query
        f"redis://store.test:6379/0?password={PASSWORD}",
        f"redis://store.test/0?password=p@{PASSWORD}",
        f"redis://gate@store.test/0?username=u&password={PASSWORD}",
        f"redis://:{PASSWORD[:5]}?{PASSWORD}@store.test/0",  # a ? in the password: no host shown
        f"redis//:{PASSWORD}@store.test/0?password={PASSWORD}",  # not a URL at all
    ],
)
def test_no_spelling_of_a_store_url_shows_its_password(spec: str) -> None:
    from proxy.approvals.store import shown_state

    shown = shown_state(spec)
    assert PASSWORD not in shown and PASSWORD[:5] not in shown, shown
    if "://" in spec and "?" not in spec.split("@")[0]:  # well formed: the store is named
        assert "store.test" in shown or "redis.sock" in shown or "[::1]:6380" in shown, shown
