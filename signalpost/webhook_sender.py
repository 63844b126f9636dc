"""The HTTP shell of webhooks: POSTs what ``signalpost.webhooks.Webhooks`` says is due.

Everything runs in its own asyncio tasks, never inside the handling of a command: a
command only queues events (``Webhooks.add``) and pokes the sender, which runs on the
next loop iteration. Each request is one ``aiohttp`` POST with the signed headers
(docs/webhooks.md); a 2xx is a delivery, anything else (another status, a timeout, a
refused connection) a failure the core retries. Copies to the runner-up go out through
the node's ``send`` (its links to its peers). With ``local`` (dev mode's own receiver,
``signalpost.dev_webhooks``) every due event is signed the same way and handed to it in
the sender's turn instead: no HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

import aiohttp

from signalpost import metrics
from signalpost.config import Settings
from signalpost.lifecycle import spawn
from signalpost.webhooks import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Attempt,
    Outbound,
    Webhooks,
    sign,
)

log = logging.getLogger("signalpost.webhooks")

#: Seconds between the sender's own ticks (copies resent, retries due).
TICK = 0.25


def webhooks_from(
    settings: Settings,
    node_id: str = "",
    replica_for: Callable[[str], str | None] | None = None,
    urls: list[str] | None = None,
) -> Webhooks:
    """A ``Webhooks`` core configured from ``settings`` (to ``urls`` instead of
    ``webhook_urls`` if given)."""
    return Webhooks(
        settings.webhook_urls if urls is None else urls,
        node_id=node_id,
        replica_for=replica_for if replica_for is not None else _no_replica,
        max_queue=settings.webhook_queue_max,
        concurrency=settings.webhook_concurrency,
        max_attempts=settings.webhook_max_attempts,
        retry_base=settings.webhook_retry_base,
        retry_max=settings.webhook_retry_max,
    )


def _no_replica(stream: str) -> str | None:
    return None


class WebhookSender:
    """Delivers a ``Webhooks`` core's events over HTTP."""

    def __init__(
        self,
        hooks: Webhooks,
        secret: str,
        *,
        timeout: float,
        send: Callable[[list[Outbound]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        local: Callable[[bytes, Mapping[str, str]], bool] | None = None,
    ) -> None:
        self.hooks = hooks
        #: Takes each delivery in this process (a 2xx: True) instead of an HTTP POST.
        self.local = local
        self.secret = secret.encode()
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.send = send
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._poked = False
        self._started = False
        self._ticker: asyncio.Task[None] | None = None
        self._posts: set[asyncio.Task[None]] = set()
        self._counted = (0, 0, 0, 0)

    async def start(self) -> None:
        if self.local is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        self._started = True
        self._ticker = spawn(self._tick(), "webhooks")

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for task in list(self._posts):
            task.cancel()
        if self._posts:
            await asyncio.gather(*self._posts, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    @classmethod
    def from_settings(
        cls,
        hooks: Webhooks,
        settings: Settings,
        *,
        send: Callable[[list[Outbound]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> WebhookSender:
        """A sender for ``hooks`` with the ``webhook_*`` settings (URLs set: ``Settings``
        then requires the secret)."""
        assert settings.webhook_secret is not None  # Settings checks it
        return cls(
            hooks, settings.webhook_secret, timeout=settings.webhook_timeout, send=send, clock=clock
        )

    def poke(self) -> None:
        """Something was queued or changed: run the sender on the next loop iteration."""
        if not self._poked and self._started:
            self._poked = True
            asyncio.get_running_loop().call_soon(self._pump)

    def _pump(self) -> None:
        self._poked = False
        now = self.clock()
        out = self.hooks.flush(now)
        if out and self.send is not None:
            self.send(out)
        if self.local is not None:
            self._hand_over(now)
        else:
            for attempt in self.hooks.due(now):
                task = asyncio.get_running_loop().create_task(self._post(attempt))
                self._posts.add(task)
                task.add_done_callback(self._posts.discard)
        self._export()

    def _hand_over(self, now: float) -> None:
        assert self.local is not None
        # A delivery makes the stream's next event due: go on until none is (each round
        # finishes at least one attempt, so this ends with the queue).
        while attempts := self.hooks.due(now):
            for attempt in attempts:
                record = attempt.record
                ok = self.local(record.body, self._headers(record.key, record.body))
                self.hooks.finished(attempt, ok, now)

    def _headers(self, key: str, body: bytes) -> dict[str, str]:
        stamp = int(time.time())
        return {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: key,
            TIMESTAMP_HEADER: str(stamp),
            SIGNATURE_HEADER: sign(self.secret, stamp, body),
            "User-Agent": "signalpost-webhooks",
        }

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self._pump()

    async def _post(self, attempt: Attempt) -> None:
        assert self._session is not None
        body = attempt.record.body
        headers = self._headers(attempt.record.key, body)
        ok = False
        try:
            async with self._session.post(attempt.url, data=body, headers=headers) as response:
                ok = 200 <= response.status < 300
                await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.debug("webhook to %s failed: %r", attempt.url, exc)
        self.hooks.finished(attempt, ok, self.clock())
        self.poke()

    def _export(self) -> None:
        hooks = self.hooks
        counted = (hooks.delivered, hooks.failed, hooks.dead, hooks.dropped)
        if counted != self._counted:
            for outcome, now, before in zip(
                ("delivered", "failed", "dead", "dropped"), counted, self._counted, strict=True
            ):
                if now > before:
                    metrics.WEBHOOK_EVENTS.labels(outcome).inc(now - before)
            self._counted = counted
        metrics.WEBHOOK_QUEUE.set(hooks.queued)
