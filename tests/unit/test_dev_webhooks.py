"""Dev mode's own webhook receiver: in process, signature-checked, bounded, and fed only
while the demo app's panel asks for it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping

from edge.backplane import DEV_PANEL_WATCH, LocalBackplane
from signalpost.config import load_settings
from signalpost.dev_webhooks import KEEP, DevInbox
from signalpost.webhook_sender import WebhookSender, webhooks_from
from signalpost.webhooks import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    make_event,
    sign,
)


def _delivery(inbox: DevInbox, key: str, secret: str | None = None) -> tuple[bytes, dict[str, str]]:
    record = make_event("room:r", key, "peer.joined", 1.0, {"room": "r"})
    stamp = int(time.time())
    headers = {
        EVENT_ID_HEADER: key,
        TIMESTAMP_HEADER: str(stamp),
        SIGNATURE_HEADER: sign(secret or inbox.secret, stamp, record.body),
    }
    return record.body, headers


def _shown(inbox: DevInbox) -> list[str]:
    return [e["event"]["id"] for e in json.loads(inbox.since("after=0"))["events"]]


def test_the_inbox_checks_signatures_shows_an_id_once_and_keeps_the_last_events() -> None:
    inbox = DevInbox()
    assert inbox.receive(*_delivery(inbox, "k0"))
    assert inbox.receive(*_delivery(inbox, "k0"))  # a resend: taken, shown once
    assert not inbox.receive(*_delivery(inbox, "k1", secret="not-the-secret"))
    assert (_shown(inbox), inbox.refused) == (["k0"], 1)
    for i in range(1, KEEP + 5):
        assert inbox.receive(*_delivery(inbox, f"k{i}"))
    shown = _shown(inbox)
    assert len(shown) == KEEP and shown[0] == "k5" and shown[-1] == f"k{KEEP + 4}"
    assert inbox.receive(*_delivery(inbox, "k0"))  # gone from the panel: shown again
    assert _shown(inbox)[-1] == "k0"
    numbers = [e["n"] for e in json.loads(inbox.since("after=0"))["events"]]
    assert json.loads(inbox.since(f"after={numbers[-2]}"))["events"][0]["event"]["id"] == "k0"


async def test_a_local_sender_hands_every_event_over_in_order_and_retries_a_refusal() -> None:
    settings = load_settings(environ={})
    hooks = webhooks_from(settings, urls=["dev-inbox:"])
    got: list[str] = []
    refuse = {"room:r:2"}

    def receive(body: bytes, headers: Mapping[str, str]) -> bool:
        key = headers[EVENT_ID_HEADER]
        if key in refuse:
            refuse.discard(key)
            return False
        got.append(key)
        return True

    sender = WebhookSender(hooks, "s", timeout=1.0, local=receive)
    await sender.start()
    try:
        for i in range(4):
            hooks.add(make_event("room:r", f"room:r:{i}", "peer.joined", 1.0, {}), 0.0)
        sender.poke()
        await asyncio.sleep(0)
        assert got == ["room:r:0", "room:r:1"]  # the refused one waits for its retry
        for _ in range(100):
            if len(got) == 4:
                break
            await asyncio.sleep(0.05)
        assert got == ["room:r:0", "room:r:1", "room:r:2", "room:r:3"]
        assert (hooks.delivered, hooks.failed) == (4, 1)
    finally:
        await sender.close()


def test_the_cores_make_webhook_events_only_while_the_panel_asks() -> None:
    now = [100.0]
    inbox = DevInbox()
    backplane = LocalBackplane(load_settings(environ={}), clock=lambda: now[0], dev_inbox=inbox)
    pokes: list[None] = []
    assert backplane.webhook_sender is not None
    backplane.webhook_sender.poke = lambda: pokes.append(None)  # type: ignore[method-assign]
    assert backplane.rooms.hooks is None and backplane.presence.hooks is None
    backplane._poke()
    assert pokes == []  # nothing to poke the sender about per command
    backplane.dev_webhooks("after=0")
    assert backplane.rooms.hooks is not None and backplane.presence.hooks is not None
    backplane._poke()
    assert pokes == [None]
    now[0] += DEV_PANEL_WATCH - 1
    backplane._watch_dev_panel(now[0])
    assert backplane.rooms.hooks is not None
    now[0] += 2
    backplane._watch_dev_panel(now[0])
    assert backplane.rooms.hooks is None and backplane.presence.hooks is None
    backplane._poke()
    assert pokes == [None]
    # real receivers (webhook_urls) get every event, whoever asks
    settings = load_settings(
        environ={}, webhook_urls=["http://127.0.0.1:9/hooks"], webhook_secret="s"
    )
    assert LocalBackplane(settings).rooms.hooks is not None
