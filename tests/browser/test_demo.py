"""The browser SDK and the demo app in real Chromium against a real ``signalpost dev``.

Demo: two pages join one room; each must decode the other's (fake camera) video, and
chat typed on one must show on the other over the RTCDataChannel. The call survives a
signaling reconnect and an ICE restart. A third page is turned away with "room full".
Hanging up tells the peer.

SDK: request/reply, resume with positions, replay, rejoin after an unrecoverable gap and
close codes are driven by a scripted fake WebSocket inside the page, so every branch is
exercised deterministically.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import SCREENSHOT, START_TIMEOUT, DemoPage

pytestmark = pytest.mark.browser


def _signalpost_command() -> list[str]:
    script = Path(sys.executable).with_name("signalpost")
    if script.exists():
        return [str(script)]
    found = shutil.which("signalpost")
    return [found] if found else [sys.executable, "-m", "signalpost.cli"]


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``signalpost dev`` on a free loopback port; yields its http base URL."""
    log_path = tmp_path_factory.mktemp("dev") / "signalpost-dev.log"
    env = {**os.environ, "SIGNALPOST_JWT_SECRET": "browser-test-secret-0123456789abcdef"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*_signalpost_command(), "dev", "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
        )
    try:
        base = _wait_ready(process, log_path)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        assert process.stdout is not None
        process.stdout.close()


def _wait_ready(process: subprocess.Popen[bytes], log_path: Path) -> str:
    """The base URL once the process printed its port and /healthz answers."""
    deadline = time.monotonic() + START_TIMEOUT
    assert process.stdout is not None
    line = b""
    while b"\n" not in line:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or process.poll() is not None:
            pytest.fail(f"signalpost dev did not start:\n{log_path.read_text()}")
        ready, _, _ = select.select([process.stdout], [], [], remaining)
        if ready:
            line += os.read(process.stdout.fileno(), 4096)
    match = re.search(rb"http://127\.0\.0\.1:(\d+)/", line)
    assert match, line
    base = f"http://127.0.0.1:{int(match.group(1))}"
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{base}/healthz", timeout=1) as response,
        ):
            if response.status == 200:
                return base
        time.sleep(0.1)
    pytest.fail(f"/healthz never answered:\n{log_path.read_text()}")


def test_two_party_call_with_chat_and_a_full_room(
    browser: Any, dev_server: str, pages: list[DemoPage]
) -> None:
    room = f"browser-{int(time.time() * 1000) % 10**8}"
    alice = DemoPage(browser, dev_server, "Alice Liddell")
    bob = DemoPage(browser, dev_server, "Bob")
    carol = DemoPage(browser, dev_server, "Carol")
    pages.extend([alice, bob, carol])

    alice.join(room)
    alice.page.wait_for_selector("#status[data-state='waiting']")
    bob.join(room)

    # Media flows both ways: each side decodes the other's fake camera.
    assert alice.wait_remote_video_frames() > 0
    assert bob.wait_remote_video_frames() > 0
    for demo in (alice, bob):
        demo.page.wait_for_selector("#status[data-state='connected']")
        assert demo.page.is_visible("#local-video")
        assert demo.page.is_hidden("#waiting")

    # Chat over the data channel, both directions.
    alice.send_chat("Hello from Alice")
    bob.wait_chat("Hello from Alice")
    bob.send_chat("Hi Alice, Bob here")
    alice.wait_chat("Hi Alice, Bob here")
    alice.page.wait_for_selector("#peer-presence[data-status='online']")
    assert "Bob" in alice.page.inner_text("#peer-name")

    # Frames keep coming: the call is live, not one frame and a freeze.
    bob.wait_frames_flowing()
    alice.page.screenshot(path=str(SCREENSHOT))

    # A third person is turned away with a clear message, and stays in the lobby.
    carol.join(room)
    error = carol.page.locator("#join-error")
    error.wait_for(state="visible")
    assert "full" in error.inner_text().lower()
    assert carol.page.is_visible("#lobby") and carol.page.is_hidden("#call")

    # Hanging up: Alice is back in the lobby, Bob is told and waits for someone new.
    alice.page.click("#hangup")
    alice.page.wait_for_selector("#lobby", state="visible")
    bob.page.locator("#chat-log .msg.system", has_text="left the call").wait_for()
    bob.page.wait_for_selector("#status[data-state='waiting']")
    bob.page.wait_for_selector("#chat-input:disabled")


def test_the_call_survives_a_signaling_reconnect_and_an_ice_restart(
    browser: Any, dev_server: str, pages: list[DemoPage]
) -> None:
    room = f"resume-{int(time.time() * 1000) % 10**8}"
    alice = DemoPage(browser, dev_server, "Alice")
    bob = DemoPage(browser, dev_server, "Bob")
    pages.extend([alice, bob])
    alice.join(room)
    alice.page.wait_for_selector("#status[data-state='waiting']")
    bob.join(room)
    alice.wait_remote_video_frames()
    bob.page.wait_for_selector("#chat-input:enabled")
    session = alice.page.evaluate("signalpostDemo.client.session")

    # Drop Alice's WebSocket without ending the session: she resumes the same session,
    # nobody sees her leave, and the room keeps working both ways.
    resumed = alice.page.evaluate(
        """() => new Promise((resolve) => {
            const client = signalpostDemo.client;
            const states = [];
            client.on('state', ({ state }) => states.push(state));
            client.on('resumed', (detail) => resolve({ ...detail, states }));
            client.reconnect();
        })"""
    )
    assert resumed["resumed"] is True and resumed["session"] == session
    assert resumed["states"] == ["reconnecting", "open"]
    alice.page.wait_for_function(
        "(room) => signalpostDemo.client.state === 'open'"
        " && signalpostDemo.client.members(room).length === 1",
        arg=room,
    )
    assert bob.page.locator("#chat-log .msg.system", has_text="left").count() == 0

    # Signaling events lost (as when a room's history is gone): the link restarts ICE
    # with new credentials and media comes back.
    alice.restart_ice(room)
    bob.wait_frames_flowing()
    alice.send_chat("still here after the reconnect")
    bob.wait_chat("still here after the reconnect")
    bob.send_chat("and after the ICE restart")
    alice.wait_chat("and after the ICE restart")


# --------------------------------------------------------------------------- SDK logic

FAKE_SOCKET_JS = """
async () => {
  const sdk = await import('/static/signalpost.js');
  class FakeSocket {
    static all = [];
    static onsend = null;
    constructor(url) {
      this.url = url; this.sent = []; this.readyState = 0; this.closedWith = null;
      FakeSocket.all.push(this);
      setTimeout(() => { this.readyState = 1; this.onopen && this.onopen({}); }, 0);
    }
    send(text) {
      const frame = JSON.parse(text);
      this.sent.push(frame);
      FakeSocket.onsend && setTimeout(() => FakeSocket.onsend(this, frame), 0);
    }
    close(code = 1005, reason = '') {
      if (this.readyState === 3) return;
      this.readyState = 3; this.closedWith = code;
      setTimeout(() => this.onclose && this.onclose({ code, reason }), 0);
    }
    push(frame) { this.onmessage && this.onmessage({ data: JSON.stringify(frame) }); }
    drop(code) { this.readyState = 3; this.onclose && this.onclose({ code, reason: '' }); }
  }
  const until = async (check, ms = 3000) => {
    const end = Date.now() + ms;
    while (!check()) {
      if (Date.now() > end) throw new Error('timed out waiting for ' + check);
      await new Promise((r) => setTimeout(r, 5));
    }
  };
  window.fake = { sdk, FakeSocket, until };
}
"""

RESUME_JS = """
async () => {
  const { sdk, FakeSocket, until } = window.fake;
  const events = [];
  let resumable = true;
  FakeSocket.onsend = (ws, f) => {
    if (f.type === 'hello') ws.push({ type: 'welcome', session: 's1', user: 'u1', resume: 'R1',
      resumed: resumable && f.resume === 'R1', ice_servers: [{ urls: 'stun:x' }], heartbeat: 25 });
    if (f.type === 'join' && f.room === 'r') ws.push(FakeSocket.all.length === 1
      ? { type: 'joined', id: f.id, room: 'r', epoch: 'e1', offset: 3,
          members: [{ session: 'p1', user: 'bob', meta: {} }] }
      : { type: 'joined', id: f.id, room: 'r', epoch: 'e2', offset: 1,
          members: [{ session: 'p2', user: 'eve', meta: {} }] });
    if (f.type === 'join' && f.room === 'full')
      ws.push({ type: 'error', id: f.id, code: 'room_full', message: 'full' });
    if (f.type === 'signal') ws.push({ type: 'ack', id: f.id });
  };
  const client = new sdk.SignalpostClient({ url: ['ws://a/v1/signal', 'ws://b/v1/signal'],
    getToken: async () => 'jwt', WebSocket: FakeSocket, backoff: { initial: 5, maximum: 20 } });
  const types = ['state', 'peer-joined', 'peer-left', 'signal', 'recovered', 'resumed',
                 'disconnected'];
  for (const type of types)
    client.on(type, (d) => events.push([type, type === 'state' ? d.state : d]));
  const welcome = await client.connect();
  const joined = await client.join('r', { name: 'U' });
  let refused = null;
  await client.join('full').catch((e) => { refused = [e.name, e.code]; });
  FakeSocket.all[0].push({ type: 'signal', room: 'r', from: { session: 'p1', user: 'bob' },
                           data: { n: 1 }, offset: 5 });
  const afterSignal = client.positions();
  const inFlight = client.request({ type: 'ping' }).catch((e) => e.code);
  FakeSocket.all[0].drop(1006);
  const lost = await inFlight;
  const queued = client.signal('r', { n: 2 });  // sent once the session is back
  await until(() => FakeSocket.all.length === 2 && client.state === 'open');
  const second = FakeSocket.all[1];
  const resumeHello = second.sent[0];
  await queued;
  second.push({ type: 'recovered', room: 'r', recovered: false });
  await until(() => events.some(([t]) => t === 'recovered'));
  const afterRecovery = client.positions();
  // A new session: the rooms are gone, the app is told which.
  resumable = false;
  second.drop(1001);
  await until(() => FakeSocket.all.length === 3 && client.state === 'open');
  const rooms = client.rooms;
  FakeSocket.all[2].drop(4401);
  await new Promise((r) => setTimeout(r, 100));
  return { welcome: welcome.session, joined: joined.epoch, refused, afterSignal, lost,
           urls: FakeSocket.all.map((s) => s.url), resumeHello,
           secondSent: second.sent.map((f) => f.type),
           afterRecovery, rooms, state: client.state, sockets: FakeSocket.all.length,
           events: JSON.parse(JSON.stringify(events)) };
}
"""


@pytest.fixture
def sdk_page(browser: Any, dev_server: str) -> Iterator[Any]:
    context = browser.new_context()
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{dev_server}/static/app.css")  # any page of the origin, without the app
    page.evaluate(FAKE_SOCKET_JS)
    yield page
    context.close()
    assert not errors, errors


def test_sdk_backoff_is_capped_exponential_with_full_jitter(sdk_page: Any) -> None:
    delays = sdk_page.evaluate(
        """() => {
            const take = (gen, n) => Array.from({ length: n }, () => gen.next().value);
            const { backoffDelays } = window.fake.sdk;
            return {
                top: take(backoffDelays({ random: () => 1 }), 8),
                bottom: take(backoffDelays({ random: () => 0 }), 3),
                some: take(backoffDelays(), 50),
            };
        }"""
    )
    assert delays["top"] == [250, 500, 1000, 2000, 4000, 8000, 10000, 10000]
    assert delays["bottom"] == [0, 0, 0]
    assert all(0 <= d < 10000 for d in delays["some"])


def test_sdk_resumes_replays_rejoins_and_stops_on_final_close_codes(sdk_page: Any) -> None:
    result = sdk_page.evaluate(RESUME_JS)
    events = result["events"]
    assert result["welcome"] == "s1" and result["joined"] == "e1"
    assert result["refused"] == ["SignalpostError", "room_full"]
    assert result["afterSignal"] == {"r": {"epoch": "e1", "offset": 5}}
    assert result["lost"] == "connection_lost"
    # Reconnects go to the next URL and carry the resume token and room positions.
    assert result["urls"] == ["ws://a/v1/signal", "ws://b/v1/signal", "ws://a/v1/signal"]
    hello = result["resumeHello"]
    assert hello["resume"] == "R1" and hello["token"] == "jwt"
    assert hello["rooms"] == {"r": {"epoch": "e1", "offset": 5}}
    # The signal queued while reconnecting went out after the hello; the unrecovered
    # room was joined again, which moved it to the new epoch.
    assert result["secondSent"] == ["hello", "signal", "join"]
    assert result["afterRecovery"] == {"r": {"epoch": "e2", "offset": 1}}
    left = [d for t, d in events if t == "peer-left"]
    arrived = [d for t, d in events if t == "peer-joined"]
    assert [(d["peer"]["session"], d["synthetic"]) for d in left] == [("p1", True)]
    assert [(d["peer"]["session"], d["synthetic"]) for d in arrived] == [("p2", True)]
    (recovered,) = [d for t, d in events if t == "recovered"]
    assert recovered["recovered"] is False and recovered["epoch"] == "e2"
    resumed = [d for t, d in events if t == "resumed"]
    assert [(d["resumed"], d["lostRooms"]) for d in resumed] == [(True, []), (False, ["r"])]
    assert result["rooms"] == []
    # 4401 is final: no further attempt.
    states = [d for t, d in events if t == "state"]
    assert states == ["connecting", "open", *["reconnecting", "open"] * 2, "closed"]
    assert result["state"] == "closed" and result["sockets"] == 3
    disconnected = [(d["code"], d["willReconnect"]) for t, d in events if t == "disconnected"]
    assert disconnected == [(1006, True), (1001, True), (4401, False)]
