"""The Python SDK's room positions, fed frames directly (no socket): what it resumes with.

The JS SDK's twin of these rules is tested in tests/browser/test_demo.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from signalpost.client import MAX_SEEN_POSITIONS, RoomPosition, SignalpostClient, _Request


def _ask(client: SignalpostClient, req: int, frame: dict[str, Any]) -> None:
    """A request with id ``req`` waiting for its answer (as ``request`` leaves it)."""
    future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    text = msgspec.json.encode({**frame, "id": req}).decode()
    client._pending[req] = _Request(req, frame["type"], text, future, 1e9, sent=True)


def _signal(room: str, offset: int) -> dict[str, Any]:
    return {
        "type": "signal",
        "room": room,
        "from": {"session": "p", "user": "u"},
        "data": {},
        "offset": offset,
    }


async def test_a_late_joined_answer_never_rewinds_past_what_was_seen_in_its_epoch() -> None:
    client = SignalpostClient("ws://127.0.0.1:1/v1/signal", "token")
    _ask(client, 1, {"type": "join", "room": "r"})
    client._on_frame(
        {"type": "joined", "id": 1, "room": "r", "epoch": "e1", "offset": 2, "members": []}
    )
    # A leave and a join pipelined; their answers come late, around events of the new
    # membership (answered from reply records after a resume, say).
    _ask(client, 2, {"type": "leave", "room": "r"})
    _ask(client, 3, {"type": "join", "room": "r"})
    client._on_frame(_signal("r", 5))
    client._on_frame({"type": "left", "id": 2, "room": "r"})
    assert client.positions == {}
    client._on_frame(_signal("r", 6))
    client._on_frame(
        {"type": "joined", "id": 3, "room": "r", "epoch": "e1", "offset": 4, "members": []}
    )
    assert client.positions == {"r": RoomPosition("e1", 6)}  # not 4: 5 and 6 would replay


async def test_another_epochs_joined_answer_starts_where_that_epoch_was_seen() -> None:
    client = SignalpostClient("ws://127.0.0.1:1/v1/signal", "token")
    _ask(client, 1, {"type": "join", "room": "r"})
    client._on_frame(
        {"type": "joined", "id": 1, "room": "r", "epoch": "e2", "offset": 7, "members": []}
    )
    # A resent join of an earlier membership is answered from its record (epoch e1), then
    # the answer of the join of this one (e2, its start): back where e2 was seen.
    _ask(client, 2, {"type": "join", "room": "r"})
    _ask(client, 3, {"type": "join", "room": "r"})
    client._on_frame(
        {"type": "joined", "id": 2, "room": "r", "epoch": "e1", "offset": 1, "members": []}
    )
    client._on_frame(
        {"type": "joined", "id": 3, "room": "r", "epoch": "e2", "offset": 3, "members": []}
    )
    assert client.positions == {"r": RoomPosition("e2", 7)}


async def test_a_refused_leave_drops_the_position_in_the_order_of_the_answers() -> None:
    client = SignalpostClient("ws://127.0.0.1:1/v1/signal", "token")
    _ask(client, 1, {"type": "join", "room": "r"})
    client._on_frame(
        {"type": "joined", "id": 1, "room": "r", "epoch": "e1", "offset": 2, "members": []}
    )
    _ask(client, 2, {"type": "leave", "room": "r"})
    _ask(client, 3, {"type": "join", "room": "r"})
    client._on_frame({"type": "error", "id": 2, "code": "not_in_room", "message": "no"})
    assert client.positions == {}
    client._on_frame(
        {"type": "joined", "id": 3, "room": "r", "epoch": "e1", "offset": 3, "members": []}
    )
    assert client.positions == {"r": RoomPosition("e1", 3)}  # the join after it stands


async def test_what_was_seen_is_bounded() -> None:
    client = SignalpostClient("ws://127.0.0.1:1/v1/signal", "token")
    for i in range(MAX_SEEN_POSITIONS + 10):
        _ask(client, 2 * i + 1, {"type": "join", "room": f"r{i}"})
        client._on_frame(
            {
                "type": "joined",
                "id": 2 * i + 1,
                "room": f"r{i}",
                "epoch": "e",
                "offset": 1,
                "members": [],
            }
        )
        _ask(client, 2 * i + 2, {"type": "leave", "room": f"r{i}"})
        client._on_frame({"type": "left", "id": 2 * i + 2, "room": f"r{i}"})
    assert len(client._seen) == MAX_SEEN_POSITIONS
    assert len(client._epoch_of) == MAX_SEEN_POSITIONS
