"""The edge writes its text frames itself: websockets' client parser must read them back."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side

from edge.websocket_link import text_frames

# Every boundary of the three header forms (7-bit, 16-bit and 64-bit length).
SIZES = [0, 1, 125, 126, 127, 65535, 65536, 200_000]


def client_reading() -> Protocol:
    """websockets' client side in the OPEN state: it rejects masked or malformed frames."""
    return Protocol(Side.CLIENT, max_size=None)


@pytest.mark.parametrize("size", SIZES)
def test_one_frame_of_each_length_parses_back(size: int) -> None:
    message = ("x" * size).encode()
    client = client_reading()
    client.receive_data(text_frames([message]))
    [event] = client.events_received()
    assert event == Frame(Opcode.TEXT, message, fin=True)


def test_a_batch_parses_back_in_order_even_split_anywhere() -> None:
    messages = [(chr(0x61 + i % 26) * size).encode() for i, size in enumerate(SIZES)]
    messages.append("é🙂".encode())  # multi-byte UTF-8: lengths are bytes
    wire = text_frames(messages)
    assert len(wire) == sum(map(len, messages)) + 2 * 4 + 4 * 3 + 10 * 2
    client = client_reading()
    for start in range(0, len(wire), 4093):  # cut headers and payloads at odd places
        client.receive_data(wire[start : start + 4093])
    assert [frame.data for frame in client.events_received()] == messages


def test_nothing_to_send_writes_nothing() -> None:
    assert text_frames([]) == b""
