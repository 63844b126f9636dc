"""WebSocketLink: one client TCP connection, driven by websockets' sans-I/O protocol.

The asyncio shell of the edge: bytes in (``data_received``) are fed to
``websockets.server.ServerProtocol``; the events that come out (the HTTP request, whole
text messages) go synchronously to a ``LinkHandler`` (the ``EdgeServer``), and what the
protocol has to send is written straight to the transport. No task per connection and
no future per frame: that is what the websockets asyncio server spent most of a relayed
message's CPU on (docs/performance.md).

The shell keeps what the asyncio server did for us: the opening handshake and plain HTTP
responses, reassembly of fragmented messages, UTF-8 validation of text (close 1007), the
frame size limit (1009), keepalive pings (``keepalive``: a peer that has not answered the
previous ping is closed with 1011) and the closing handshake with a timeout.

The common frame takes a shorter path both ways. In: the shell splits the byte stream
into frames itself (the header says where each ends); a whole, masked, unfragmented text
frame within the size limit is unmasked and served here, and every other frame (control,
fragmented, binary, malformed, too big) is handed whole to the protocol, whose parser so
always starts at a frame boundary. Out: text frames are built here (``text_frames``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol, cast

from websockets.frames import CloseCode as WsCloseCode
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.speedups import apply_mask  # websockets' C unmasking (ships in its wheels)

log = logging.getLogger("signalpost.edge")

#: Seconds a closing handshake may take before the TCP connection is dropped.
CLOSE_TIMEOUT = 10.0

_TEXT = Opcode.TEXT
_CONT = Opcode.CONT
_BINARY = Opcode.BINARY
_PONG = Opcode.PONG
_OPEN = State.OPEN
_CONNECTING = State.CONNECTING
#: FIN, no RSV bits, text opcode: the first header byte of a whole text frame.
_WHOLE_TEXT = 0x81
#: Bytes of a request looked at to tell a server API request (``edge.server_api``) from a
#: WebSocket handshake or a page: ``GET /v1/api/`` and any other method than GET go there.
_SNIFF = len(b"GET /v1/api/")
#: FIN + text opcode, then the 7-bit payload length: every header of a short text frame.
_SHORT_TEXT_HEADERS = [bytes((0x81, size)) for size in range(126)]


def text_frames(messages: list[bytes]) -> bytes:
    """``messages`` (UTF-8) as a server's text frames: unmasked, unfragmented (RFC 6455 5.2)."""
    parts: list[bytes] = []
    append = parts.append
    for message in messages:
        size = len(message)
        if size < 126:
            append(_SHORT_TEXT_HEADERS[size])
        elif size < 65536:
            append(b"\x81\x7e" + size.to_bytes(2, "big"))
        else:
            append(b"\x81\x7f" + size.to_bytes(8, "big"))
        append(message)
    return b"".join(parts)


class HttpHandoff(Protocol):
    """An ``asyncio.Protocol`` that takes a connection over from its link."""

    def take_over(self, transport: asyncio.Transport, data: bytes) -> None:
        """Go on with ``transport`` from ``data`` (the bytes read so far)."""


class LinkHandler(Protocol):
    """What a link hands its events to."""

    def on_http(self, link: WebSocketLink, head: bytes) -> HttpHandoff | None:
        """A request that is no handshake nor page (``_SNIFF``): who takes the
        connection over (its ``connection_lost`` must call ``on_closed``), or None."""

    def on_request(self, link: WebSocketLink, request: Request) -> Response:
        """Answer the HTTP request: a 101 from ``link.protocol.accept`` opens the link."""

    def on_connect(self, link: WebSocketLink) -> bool:
        """A TCP connection was accepted (``link.peer`` is its address): False drops it."""

    def on_open(self, link: WebSocketLink) -> None:
        """The WebSocket handshake completed."""

    def on_text(self, link: WebSocketLink, message: bytes) -> None:
        """A whole text message arrived (valid UTF-8)."""

    def on_binary(self, link: WebSocketLink) -> None:
        """A binary message arrived."""

    def on_closed(self, link: WebSocketLink) -> None:
        """The TCP connection is gone."""


class WebSocketLink(asyncio.Protocol):
    """One connection: an ``asyncio.Protocol`` feeding a ``ServerProtocol``."""

    def __init__(
        self, handler: LinkHandler, max_size: int, handshake_timeout: float | None = None
    ) -> None:
        self.handler = handler
        # A connection that has not completed its opening handshake in this time (sent
        # nothing, half a request line, headers trickling in) is dropped: the hello
        # timeout only starts once the WebSocket is open.
        self.handshake_timeout = handshake_timeout
        self._handshake_timer: asyncio.TimerHandle | None = None
        # No extensions offered: no per-message deflate (it costs ~300 KiB per connection).
        self.protocol = ServerProtocol(max_size=max_size)
        self.max_size = max_size
        self.transport: asyncio.Transport | None = None
        self.peer = ""  # the peer's IP address ("" when the transport has none)
        self.request: Request | None = None
        self.awaiting_pong = False
        self._fragments: list[bytes] | None = None  # parts of a fragmented text message
        self._close_timer: asyncio.TimerHandle | None = None
        self._partial = bytearray()  # the start of a frame not complete yet
        self._wanted = 0  # how long ``_partial`` must grow before it is worth parsing again
        self._head_tail = b""  # the last bytes of a request head still coming in
        self._continuing = False  # the protocol is inside a fragmented message
        self._protocol_only = False  # from now on every byte goes to the protocol
        self._sniff: bytes | None = b""  # the first bytes, until they say what the request is

    # ----------------------------------------------------------------- asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and peername:
            self.peer = str(peername[0]).removeprefix("::ffff:")  # IPv4-mapped: as IPv4
        if not self.handler.on_connect(self):
            self.abort()  # connection_lost still follows: on_closed is called
            return
        if self.handshake_timeout is not None:
            self._handshake_timer = asyncio.get_running_loop().call_later(
                self.handshake_timeout, self.abort
            )

    def data_received(self, data: bytes) -> None:
        if self._partial:
            # Bytes trickling in for one frame are only collected until the header's length
            # is there: parsing the whole buffer again on each would be quadratic.
            self._partial += data
            if len(self._partial) < self._wanted:
                return
            data, self._partial = bytes(self._partial), bytearray()
        if self._protocol_only:
            self._feed(data)
        elif self.protocol.state is _OPEN:
            self._split(data)
        elif self.protocol.state is _CONNECTING:
            self._handshake(data)
        else:  # closing, closed by us (keepalive, 1007, ...): the protocol takes it from here
            self._hand_over(data)
        if self.protocol.writes:  # a pong, a close, the 101: what the protocol queued itself
            self.flush()

    def eof_received(self) -> bool | None:
        if self._partial:  # a cut frame: the protocol reports it as such
            partial, self._partial = bytes(self._partial), bytearray()
            self._feed(partial)
        self.protocol.receive_eof()
        self.flush()
        return None  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_timer is not None:
            self._close_timer.cancel()
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
        self.handler.on_closed(self)

    # ----------------------------------------------------------------- input

    def _feed(self, data: bytes) -> None:
        """Let the protocol parse ``data``; act on what it found, in order."""
        protocol = self.protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if isinstance(event, Frame):
                self._frame(event)
            elif isinstance(event, Request):
                self._request(event)
        if protocol.close_expected():  # a close frame or a protocol error: expect the TCP close
            self._arm_close_timer()

    def _hand_over(self, data: bytes) -> None:
        """From now on every byte goes to the protocol, starting with ``data``."""
        self._protocol_only = True
        if data:
            self._feed(data)

    def _handshake(self, data: bytes) -> None:
        """Give the protocol the request head alone; frames behind it go to ``_split``."""
        if self._sniff is not None:
            data = self._sniff + data
            if len(data) < _SNIFF and b"\n" not in data:
                self._sniff = data
                return
            self._sniff = None
            if (not data.startswith(b"GET ") or data.startswith(b"GET /v1/api/")) and (
                self._hand_to_http(data)
            ):
                return
        tail = self._head_tail
        joined = tail + data  # a blank line may straddle two segments
        end = joined.find(b"\r\n\r\n")
        if end < 0:  # the protocol buffers the head (and enforces its limits)
            self._head_tail = joined[-3:]
            self._feed(data)
            return
        end += 4 - len(tail)  # just after the blank line, in ``data``
        self._head_tail = b""
        self._feed(data[:end])
        rest = data[end:]
        if self.protocol.state is _OPEN:
            if rest:
                self._split(rest)
        else:  # refused, or a plain HTTP answer: the protocol discards the rest
            self._hand_over(rest)

    def _hand_to_http(self, data: bytes) -> bool:
        """Give the connection to the handler's HTTP side, if it takes it."""
        handoff = self.handler.on_http(self, data)
        if handoff is None or self.transport is None:
            return False
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.transport.set_protocol(cast(asyncio.BaseProtocol, handoff))
        handoff.take_over(self.transport, data)
        return True

    def _split(self, data: bytes) -> None:
        """Serve the whole frames at the start of ``data``; keep an incomplete one."""
        protocol = self.protocol
        self._wanted = 0  # unless a header says how much more to wait for
        max_size = self.max_size
        size = len(data)
        start = 0
        while size - start >= 2:
            first, second = data[start], data[start + 1]
            length = second & 0x7F
            if length < 126:
                head = start + 2
            elif length == 126:
                head = start + 4
                if head > size:
                    break
                length = int.from_bytes(data[start + 2 : head], "big")
            else:
                head = start + 10
                if head > size:
                    break
                length = int.from_bytes(data[start + 2 : head], "big")
            if length > max_size:  # the protocol closes 1009 without waiting for the payload
                self._hand_over(data[start:])
                start = size
                break
            if second & 0x80:
                head += 4
            end = head + length
            if end > size:
                self._wanted = end - start
                break
            if first == _WHOLE_TEXT and second & 0x80 and not self._continuing:
                self._text(apply_mask(memoryview(data)[head:end], data[head - 4 : head]))
            else:
                opcode = first & 0x0F
                if opcode == 1 or opcode == 2:  # a data frame; fin says whether more follow
                    self._continuing = not first & 0x80
                elif opcode == 0 and first & 0x80:
                    self._continuing = False
                self._feed(data[start:end])
            start = end
            if protocol.state is not _OPEN:  # closing: the protocol takes it from here
                self._hand_over(data[start:])
                start = size
                break
        if start < size:
            self._partial = bytearray(memoryview(data)[start:])

    # ----------------------------------------------------------------- events

    def _request(self, request: Request) -> None:
        self.request = request
        try:
            response = self.handler.on_request(self, request)
        except Exception:
            log.exception("answering %s failed", request.path)
            response = self.protocol.reject(500, "internal error\n")
        response.headers["Server"] = "signalpost"
        self.protocol.send_response(response)
        if self._handshake_timer is not None and self.protocol.state is _OPEN:
            # Open: the hello timeout takes over. (After any other answer the timer stays:
            # a client that keeps the connection open is dropped when it fires.)
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if self.protocol.state is _OPEN:
            self.flush()  # the 101 goes out before anything the handler writes
            self.handler.on_open(self)

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        data = cast(bytes, frame.data)  # the parser makes bytes
        if opcode is _TEXT:
            if frame.fin:
                self._text(data)
            else:
                self._fragments = [data]
        elif opcode is _CONT:
            if self._fragments is None:  # continues a binary message
                if frame.fin:
                    self.handler.on_binary(self)
                return
            self._fragments.append(data)
            if frame.fin:
                parts, self._fragments = self._fragments, None
                self._text(b"".join(parts))
        elif opcode is _PONG:
            self.awaiting_pong = False
        elif opcode is _BINARY and frame.fin:
            self.handler.on_binary(self)

    def _text(self, message: bytes) -> None:
        try:
            message.decode()
        except UnicodeDecodeError as exc:
            # A frame relayed as it came must not carry bytes a browser would choke on.
            self.close(WsCloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
            return
        self.handler.on_text(self, message)

    # ----------------------------------------------------------------- output

    @property
    def is_open(self) -> bool:
        return self.protocol.state is _OPEN

    def send_texts(self, messages: list[bytes]) -> None:
        """Write ``messages`` (UTF-8 text) in one transport write, if the link is open.

        Frames are built here rather than by ``protocol.send_text``: a server's text frame
        is a 2-10 byte header and the payload (RFC 6455 5.2, unmasked, unfragmented), and
        websockets' general serializer cost more than the rest of a relay's write path.
        """
        protocol = self.protocol
        if protocol.state is not _OPEN:
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            # Aborted, or reset by the peer, before the protocol heard of it (uvloop raises
            # on a write to a closed transport): nobody reads these any more.
            return
        if protocol.writes:
            self.flush()  # what the protocol queued itself (a pong) goes first
        transport.write(text_frames(messages))

    def flush(self) -> None:
        """Write whatever the protocol has to send; b"" from it means half-close."""
        chunks = self.protocol.data_to_send()
        if not chunks:
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return  # (see ``send_texts``)
        if len(chunks) == 1 and chunks[0]:
            transport.write(chunks[0])
            return
        for chunk in chunks:
            if chunk:
                transport.write(chunk)
            elif transport.can_write_eof():
                transport.write_eof()
                self._arm_close_timer()
            else:
                transport.close()

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake (or drop a connection that is not a WebSocket yet)."""
        state = self.protocol.state
        if state is _OPEN:
            self.protocol.send_close(code, reason)
            self.flush()
            self._arm_close_timer()
        elif state is State.CONNECTING and self.transport is not None:
            self.transport.abort()

    def keepalive(self) -> None:
        """Ping; a peer that did not answer the previous ping is gone (1011)."""
        if self.protocol.state is not _OPEN:
            return
        if self.awaiting_pong:
            self.protocol.fail(WsCloseCode.INTERNAL_ERROR, "keepalive ping timeout")
            self.flush()
            self._arm_close_timer()
            return
        self.awaiting_pong = True
        self.protocol.send_ping(b"")
        self.flush()

    def write_buffer_size(self) -> int:
        return 0 if self.transport is None else self.transport.get_write_buffer_size()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _arm_close_timer(self) -> None:
        if self._close_timer is None:
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(CLOSE_TIMEOUT, self.abort)
