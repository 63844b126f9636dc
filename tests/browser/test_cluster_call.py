"""A browser call through a real cluster survives the kill -9 of one caller's edge.

Alice's page signals through edge 1, Bob's through edge 2 (both list the other edge as a
fallback). Edge 1 is killed with SIGKILL mid-call: Alice's SDK reconnects to edge 2 and
resumes the same session; Bob never sees her leave; media and chat keep flowing; and
signaling still works end to end afterwards (an ICE restart negotiated through edge 2).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.browser.conftest import CALL_TIMEOUT_MS, DemoPage
from tests.cluster.conftest import Cluster, ClusterFactory
from tests.helpers import token

pytestmark = [pytest.mark.browser, pytest.mark.cluster]


def _http_base(ws_url: str) -> str:
    return ws_url.replace("ws://", "http://", 1).removesuffix("/v1/signal")


def test_a_call_survives_the_kill_of_one_callers_edge(
    browser: Any,
    cluster_factory: ClusterFactory,
    pages: list[DemoPage],
) -> None:
    cluster: Cluster = cluster_factory(edges=2, brokers=1, SIGNALPOST_RESUME_WINDOW="30")
    edge1, edge2 = cluster.edge_urls
    room = f"cluster-call-{int(time.time() * 1000) % 10**8}"
    alice = DemoPage(browser, _http_base(edge1), "Alice")
    bob = DemoPage(browser, _http_base(edge2), "Bob")
    pages.extend([alice, bob])

    alice.join(room, signal=f"{edge1},{edge2}", token=token("alice"))
    alice.page.wait_for_selector("#status[data-state='waiting']")
    bob.join(room, signal=f"{edge2},{edge1}", token=token("bob"))
    alice.wait_remote_video_frames()
    bob.wait_remote_video_frames()
    alice.send_chat("before the crash")
    bob.wait_chat("before the crash")
    session = alice.page.evaluate("signalpostDemo.client.session")
    alice.page.evaluate(
        """() => { window.resumedOnce = new Promise((resolve) =>
            signalpostDemo.client.on('resumed', (detail) => resolve(detail))); }"""
    )

    cluster.kill("edge-1")  # SIGKILL: no close frame, no goodbye to the brokers

    resumed = alice.page.evaluate("window.resumedOnce")
    assert resumed["resumed"] is True and resumed["session"] == session
    alice.page.wait_for_function(
        "(url) => signalpostDemo.client.state === 'open' && signalpostDemo.client.url === url",
        arg=edge2,
        timeout=CALL_TIMEOUT_MS,
    )
    # The call was never dropped: Bob saw no one leave, media flows both ways, chat works.
    assert bob.page.locator("#chat-log .msg.system", has_text="left").count() == 0
    bob.wait_frames_flowing()
    alice.wait_frames_flowing()
    alice.send_chat("after the crash")
    bob.wait_chat("after the crash")

    # Signaling itself works after the resume: an ICE restart offer from Alice goes out
    # through edge 2 and the broker, Bob answers, and the connection is up again.
    alice.restart_ice(room)
    bob.send_chat("still connected")
    alice.wait_chat("still connected")
