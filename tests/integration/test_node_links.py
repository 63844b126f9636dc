"""CurveZMQ node links over real sockets: who is admitted, who is dialled, what is too big.

A ROUTER with keys admits a DEALER only if its public key has a file in the cluster keys
directory (ZAP); a refused one is logged and counted, and what it sent never reaches the
node. A DEALER dials only an endpoint a certificate names. A message over
``max_message`` drops the sender's connection before it reaches Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from prometheus_client import REGISTRY
from zmq.utils.monitor import recv_monitor_message

from signalpost.config import load_settings
from signalpost.node_keys import NodeKeys, create_node_keys, node_keys
from signalpost.transport import DealerLink, RouterEndpoint, frame
from signalpost.wire import Deliver, Envelope, Heartbeat, encode_envelope
from tests.helpers import curve_dealer
from tests.integration.test_transport import Collected, receive_raw

MAX_MESSAGE = 64 * 1024


@pytest.fixture
def context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def keys_of(directory: Path, name: str, endpoint: str | None = None) -> NodeKeys:
    """Write a key pair for ``name`` into ``directory`` and load it as that node would
    (an ``owner-*`` is a broker, anything else an edge)."""
    kind = "broker" if name.startswith("owner") else "edge"
    _, secret_path = create_node_keys(directory, name, endpoint, kind=kind)
    keys = node_keys(
        load_settings(environ={}, node_key_file=str(secret_path), cluster_keys_dir=str(directory))
    )
    assert keys is not None
    return keys


def trust(directory: Path, name: str, public: bytes, endpoint: str) -> None:
    """Write a public certificate naming ``public`` as the server key of ``endpoint``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.key").write_text(
        f'metadata\n    kind = "broker"\n    endpoint = "{endpoint}"\n'
        f'curve\n    public-key = "{public.decode()}"\n'
    )


def link(context: zmq.Context[Any], endpoint: str, keys: NodeKeys) -> DealerLink:
    """A DealerLink of node ``edge-x`` with ``keys``, nobody listening to what it gets."""
    return DealerLink(
        context,
        endpoint,
        "edge-x",
        "inc-x",
        on_envelope=lambda envelope: None,
        on_up=lambda link, fresh: None,
        on_down=lambda link: None,
        heartbeat_interval=60.0,
        peer_expiry=120.0,
        keys=keys,
        max_message=MAX_MESSAGE,
    )


def refused(reason: str) -> float:
    value = REGISTRY.get_sample_value("signalpost_node_links_refused_total", {"reason": reason})
    return value or 0.0


def deliver(n: int) -> Deliver:
    return Deliver([f"s{n}"], b'{"n":%d}' % n, "conn", n)


def router(
    context: zmq.Context[Any], keys: NodeKeys | None, got: Collected[tuple[str, Envelope]]
) -> RouterEndpoint:
    return RouterEndpoint(
        context,
        "tcp://127.0.0.1:*",
        "owner-1",
        on_envelope=lambda peer, envelope: got.append((peer, envelope)),
        on_peer_lost=lambda peer: None,
        on_peer_restarted=lambda peer: None,
        heartbeat_interval=60.0,
        peer_expiry=120.0,
        keys=keys,
        max_message=MAX_MESSAGE,
    )


async def until(condition: Any, timeout: float = 10.0) -> None:
    """Wait (bounded) until ``condition()`` holds: a counter bumped in the ZAP thread or a
    monitor socket, which have no event to await."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def test_curve_links_carry_envelopes_both_ways(
    context: zmq.Context[Any], tmp_path: Path
) -> None:
    owner_keys = keys_of(tmp_path, "owner-1", "tcp://127.0.0.1:PORT")
    edge_keys = keys_of(tmp_path, "edge-1")
    at_owner: Collected[tuple[str, Envelope]] = Collected()
    at_edge: Collected[Envelope] = Collected()
    up = asyncio.Event()
    async with router(context, owner_keys, at_owner) as endpoint:
        # The certificate names the endpoint as bound (port 0 picked one): write it again.
        (tmp_path / "owner-1.key").write_text(
            (tmp_path / "owner-1.key")
            .read_text()
            .replace("tcp://127.0.0.1:PORT", endpoint.endpoint)
        )
        link = DealerLink(
            context,
            endpoint.endpoint,
            "edge-1",
            "inc-1",
            on_envelope=at_edge.append,
            on_up=lambda link, fresh: up.set(),
            on_down=lambda link: None,
            heartbeat_interval=60.0,
            peer_expiry=120.0,
            keys=edge_keys,
            max_message=MAX_MESSAGE,
        )
        assert link.dialled
        link.start()
        await asyncio.wait_for(up.wait(), 10)
        for n in range(50):
            link.send(deliver(n))
            endpoint.send("edge-1", deliver(-n))
        await asyncio.wait_for(at_owner.reach(50), 10)
        await asyncio.wait_for(at_edge.reach(50), 10)
        assert at_owner == [("edge-1", deliver(n)) for n in range(50)]
        assert at_edge == [deliver(-n) for n in range(50)]
        await link.close()


async def test_a_node_not_on_the_allow_list_is_refused_logged_and_counted(
    context: zmq.Context[Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trusted_dir, rogue_dir = tmp_path / "cluster", tmp_path / "rogue"
    owner_keys = keys_of(trusted_dir, "owner-1")
    edge_keys = keys_of(trusted_dir, "edge-1")
    rogue_keys = keys_of(rogue_dir, "rogue")  # a valid pair, but not in the cluster's directory
    got: Collected[tuple[str, Envelope]] = Collected()
    before = {r: refused(r) for r in ("unknown_key", "plaintext", "refused_by_server")}
    with caplog.at_level(logging.WARNING, logger="signalpost.node_keys"):
        async with router(context, owner_keys, got) as endpoint:
            # A DealerLink with the rogue's keys (its directory names the owner's key):
            # the rogue side is told it was refused.
            trust(rogue_dir, "owner-1", owner_keys.public, endpoint.endpoint)
            rogue_link = link(context, endpoint.endpoint, rogue_keys)
            rogue_link.start()
            rogue = curve_dealer(
                context, endpoint.endpoint, b"edge-1", rogue_keys, owner_keys.public
            )
            plain = context.socket(zmq.DEALER)  # no CurveZMQ at all
            plain.setsockopt(zmq.LINGER, 0)
            plain.setsockopt(zmq.IDENTITY, b"edge-1")
            plain.connect(endpoint.endpoint)
            forged = frame([encode_envelope(deliver(666))])
            rogue.send(forged)
            plain.send(forged)
            await until(
                lambda: all(refused(r) > before[r] for r in before)  # at the owner and the rogue
            )
            # A trusted node is served, after the rogue and the plaintext one tried.
            good = curve_dealer(context, endpoint.endpoint, b"edge-1", edge_keys, owner_keys.public)
            good.send(frame([encode_envelope(deliver(1))]))
            await asyncio.wait_for(got.reach(1), 10)
            with contextlib.suppress(zmq.Again):  # refused: maybe no peer to queue for
                rogue.send(forged, zmq.NOBLOCK)  # it keeps trying: still nothing gets through
            good.send(frame([encode_envelope(deliver(2))]))
            await asyncio.wait_for(got.reach(2), 10)
            assert got == [("edge-1", deliver(1)), ("edge-1", deliver(2))]
            for sock in (rogue, plain, good):
                sock.close()
            await rogue_link.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any("refused a node link" in m and rogue_keys.public.decode() in m for m in messages)
    assert any("plaintext link to " + endpoint.endpoint in m for m in messages)
    assert any(endpoint.endpoint + " refused this node's key" in m for m in messages)


async def test_a_dealer_verifies_the_server_key(context: zmq.Context[Any], tmp_path: Path) -> None:
    # An impostor bound where the owner should be, with a key of its own: the edge dials
    # with the owner's key from the directory, so the handshake fails and nothing flows.
    owner_keys = keys_of(tmp_path / "cluster", "owner-1")
    edge_keys = keys_of(tmp_path / "cluster", "edge-1")
    impostor_keys = keys_of(tmp_path / "impostor", "impostor")
    got: Collected[tuple[str, Envelope]] = Collected()
    before = {r: refused(r) for r in ("bad_handshake", "server_unverified")}
    async with router(context, impostor_keys, got) as impostor:
        # An edge's own link, its directory naming the owner's key at this endpoint: it
        # is told the node there is not the one it expected.
        trust(tmp_path / "cluster", "owner-1-here", owner_keys.public, impostor.endpoint)
        edge_link = link(context, impostor.endpoint, edge_keys)
        assert edge_link.dialled
        edge_link.start()
        wrong = curve_dealer(context, impostor.endpoint, b"edge-1", edge_keys, owner_keys.public)
        wrong.send(frame([encode_envelope(deliver(1))]))
        # Marker: a client that knows the impostor's real key (and is on its list) gets
        # through, so the impostor serves; the one holding the owner's key never does.
        right = curve_dealer(
            context, impostor.endpoint, b"impostor", impostor_keys, impostor_keys.public
        )
        right.send(frame([encode_envelope(deliver(2))]))
        await asyncio.wait_for(got.reach(1), 10)
        await asyncio.sleep(0.3)  # the wrong one had every chance to connect meanwhile
        assert got == [("impostor", deliver(2))]
        await until(lambda: all(refused(r) > before[r] for r in before))  # both sides count
        assert not edge_link.alive
        wrong.close()
        right.close()
        await edge_link.close()


async def test_an_endpoint_no_certificate_names_is_not_dialled(
    context: zmq.Context[Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    edge_keys = keys_of(tmp_path, "edge-1")
    before = refused("no_server_key")
    link = DealerLink(
        context,
        "tcp://127.0.0.1:1",
        "edge-1",
        "inc-1",
        on_envelope=lambda envelope: None,
        on_up=lambda link, fresh: None,
        on_down=lambda link: None,
        heartbeat_interval=60.0,
        peer_expiry=120.0,
        keys=edge_keys,
        max_message=MAX_MESSAGE,
    )
    assert not link.dialled
    assert refused("no_server_key") == before + 1
    assert any("not dialling tcp://127.0.0.1:1" in r.getMessage() for r in caplog.records)
    link.start()
    for n in range(100):  # dropped: an unconnected socket would keep them forever
        link.send(deliver(n))
    await asyncio.sleep(0.01)  # a flush would have run
    assert not link._socket._backlog and not link._outbox._pending
    await link.close()


async def test_an_oversize_message_drops_the_connection_and_the_node_goes_on(
    context: zmq.Context[Any], tmp_path: Path
) -> None:
    owner_keys = keys_of(tmp_path, "owner-1")
    edge_keys = keys_of(tmp_path, "edge-1")
    got: Collected[tuple[str, Envelope]] = Collected()
    monitor_events: list[int] = []
    async with router(context, owner_keys, got) as endpoint:
        dealer = curve_dealer(context, endpoint.endpoint, b"edge-1", edge_keys, owner_keys.public)
        monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        dealer.send(frame([encode_envelope(Heartbeat("edge-1", "inc-1"))]))
        await asyncio.wait_for(receive_raw(dealer), 10)  # connected: the owner answered
        big = Deliver(["s"], b"x" * MAX_MESSAGE, "conn", 1)
        dealer.send(frame([encode_envelope(big)]))

        def disconnected() -> bool:
            while True:
                try:
                    event = recv_monitor_message(monitor, zmq.NOBLOCK)
                except zmq.Again:
                    return zmq.EVENT_DISCONNECTED in monitor_events
                monitor_events.append(int(event["event"]))

        await until(disconnected)  # libzmq dropped the link over the oversize message
        # The dealer reconnects; the next message within the limit is handled.
        dealer.send(frame([encode_envelope(deliver(2))]))
        await asyncio.wait_for(got.reach(1), 10)
        assert got == [("edge-1", deliver(2))]
        dealer.disable_monitor()
        monitor.close()
        dealer.close()
