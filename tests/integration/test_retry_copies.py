"""An edge writes a relayed signal once, however many copies of it the brokers send.

After a broker failover the successor re-delivers the event of a request the edge retries
(it cannot know whether the dead owner delivered it); the copy carries the same origin
(sender connection, request seq) and the edge drops it.
"""

from __future__ import annotations

from typing import Any

import pytest

from edge.server import EdgeServer
from signalpost.wire import Deliver
from tests.helpers import raw_client, url_of


def signal(n: int) -> bytes:
    return b'{"type":"signal","room":"r","data":{"n":%d},"offset":%d}' % (n, n)


def signal_frame(n: int) -> dict[str, Any]:
    """The frame a client reads for ``signal(n)``."""
    return {"type": "signal", "room": "r", "data": {"n": n}, "offset": n}


@pytest.mark.parametrize("with_bystander", [False, True], ids=["one-peer", "two-peers"])
async def test_copies_of_a_delivery_reach_each_client_once(
    dev: EdgeServer, with_bystander: bool
) -> None:
    url = url_of(dev)
    bob = await raw_client(url, "bob")
    carol = await raw_client(url, "carol")
    targets = [bob.welcome["session"]]
    if with_bystander:
        targets.append(carol.welcome["session"])
    for seq in (5, 5, 6, 5, 6):  # 5 and 6 from one sender connection, with copies
        dev.receive(Deliver(targets, signal(seq), "sender-conn", seq))
    dev.receive(Deliver(targets, signal(7), "other-conn", 5))  # another sender: its own seqs
    # The marker, to both: a copy written to either, or anything written to carol when
    # she is no target, is read before it.
    dev.receive(Deliver([bob.session, carol.session], signal(8), "marker-conn", 1))
    expected = [signal_frame(n) for n in (5, 6, 7)]
    assert [await bob.recv() for _ in range(3)] == expected
    await bob.until_markers(signal_frame(8))
    if with_bystander:
        assert [await carol.recv() for _ in range(3)] == expected
    await carol.until_markers(signal_frame(8))
