"""Shared by the browser tests: the system's Chromium driven by Playwright, and a demo page."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.binaries import require_binary, require_module

# The cluster tests' fixture, for calls through a real multi-process cluster.
from tests.cluster.conftest import cluster_factory  # noqa: F401

#: Chromium on PATH: Debian calls it chromium, Ubuntu and others chromium-browser.
CHROMIUM_NAMES = ("chromium", "chromium-browser")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
START_TIMEOUT = 20.0
CALL_TIMEOUT_MS = 30_000
SCREENSHOT = Path("/tmp/demo-call.png")
#: The ICE username fragment of the page's current local description.
UFRAG_JS = "(() => signalpostDemo.link.pc.localDescription.sdp.match(/a=ice-ufrag:(\\S+)/)[1])()"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = require_binary(*CHROMIUM_NAMES)
    sync_api = require_module("playwright.sync_api", "pip install -e '.[webrtc]'")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class DemoPage:
    """One user of the demo in its own browser context."""

    def __init__(self, browser: Any, base: str, name: str) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 760})
        self.page = self.context.new_page()
        self.page.set_default_timeout(CALL_TIMEOUT_MS)
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.base = base
        self.name = name

    def join(self, room: str, **params: str) -> None:
        """Open the demo for ``room`` (extra query ``params``: signal, token) and join."""
        query = urllib.parse.urlencode({"room": room, **params})
        self.page.goto(f"{self.base}/?{query}")
        self.page.fill("#name", self.name)
        assert self.page.input_value("#room") == room
        self.page.click("#join")

    def wait_remote_video_frames(self) -> int:
        """Poll until the remote <video> has decoded frames; returns how many."""
        handle = self.page.wait_for_function(
            """() => {
                const video = document.querySelector('#remote-video');
                const frames = video.getVideoPlaybackQuality().totalVideoFrames;
                return video.srcObject && !video.paused && video.videoWidth > 0 && frames > 0
                    ? frames : false;
            }""",
            polling=200,
            timeout=CALL_TIMEOUT_MS,
        )
        frames: int = handle.json_value()
        return frames

    def wait_frames_flowing(self) -> None:
        """Remote video keeps decoding: more frames arrive (the call is live, not frozen)."""
        frames = self.wait_remote_video_frames()
        self.page.wait_for_function(
            "(n) => document.querySelector('#remote-video')"
            ".getVideoPlaybackQuality().totalVideoFrames > n",
            arg=frames + 5,
            polling=200,
            timeout=CALL_TIMEOUT_MS,
        )

    def restart_ice(self, room: str) -> None:
        """Tell the page its room lost events (``recovered: false``): its PeerLink restarts
        ICE with new credentials through signaling; wait until connected again."""
        before = self.page.evaluate(UFRAG_JS)
        self.page.evaluate(
            """(room) => signalpostDemo.client.dispatchEvent(new CustomEvent('recovered',
                { detail: { type: 'recovered', room, recovered: false } }))""",
            room,
        )
        self.page.wait_for_function(
            f"(before) => signalpostDemo.link.pc.signalingState === 'stable'"
            f" && {UFRAG_JS} !== before"
            " && signalpostDemo.link.pc.connectionState === 'connected'",
            arg=before,
            polling=200,
            timeout=CALL_TIMEOUT_MS,
        )

    def send_chat(self, text: str) -> None:
        self.page.wait_for_selector("#chat-input:enabled")
        self.page.fill("#chat-input", text)
        self.page.click("#chat-send")

    def wait_chat(self, text: str) -> None:
        self.page.locator("#chat-log .msg.theirs .bubble", has_text=text).wait_for()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def pages(browser: Any) -> Iterator[list[DemoPage]]:
    opened: list[DemoPage] = []
    yield opened
    for demo in opened:
        demo.close()
    errors = [error for demo in opened for error in demo.errors]
    assert not errors, errors
