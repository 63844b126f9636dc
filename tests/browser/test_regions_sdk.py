"""The browser SDK's regions in real Chromium: per-region URL lists, fallback region by
region with the session resumed in the next (a scripted fake WebSocket, as in
test_demo.py), and the nearest region picked by timed GETs of ``/healthz`` against a real
``signalpost dev`` and a real delaying relay in front of it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from signalpost.cluster import free_port
from tests.browser.test_demo import FAKE_SOCKET_JS, dev_server, sdk_page  # noqa: F401

pytestmark = pytest.mark.browser

PURE_JS = """
() => {
  const { EdgePlan, regionsOf, rankRegions, probeUrl } = window.fake.sdk;
  const plan = new EdgePlan(regionsOf({ eu: ['eu-1', 'eu-2'], us: ['us-1'] }));
  const walk = [[plan.region, plan.url]];
  for (const step of ['failed', 'failed', 'failed', 'succeeded', 'failed']) {
    plan[step]();
    if (step === 'failed') walk.push([plan.region, plan.url]);
  }
  const list = new EdgePlan(regionsOf(['a', 'b', 'c']));
  const round = [list.url];
  for (let i = 0; i < 4; i++) { list.failed(); round.push(list.url); }
  const refused = [];
  for (const bad of [[], {}, { eu: [] }, { eu: "ws://x" }]) {
    try { regionsOf(bad); } catch (err) { refused.push(err.name); }
  }
  plan.prefer(rankRegions(['eu', 'us'], { eu: 90, us: 10 }));
  return { walk, round, refused, preferred: [plan.region, plan.urls],
           ranked: rankRegions(['us', 'eu', 'ap', 'sa'], { us: 90, eu: 10, ap: null }),
           probe: probeUrl('wss://edge.example:8443/v1/signal'),
           fromUrl: regionsOf(new URL('ws://edge.example/v1/signal')) };
}
"""


def test_sdk_edge_plan_walks_regions_and_ranks_them(sdk_page: Any) -> None:  # noqa: F811
    result = sdk_page.evaluate(PURE_JS)
    assert result["walk"] == [
        ["eu", "eu-1"],
        ["eu", "eu-2"],
        ["us", "us-1"],  # every eu edge failed in a row: the next region
        ["eu", "eu-1"],  # around again
        ["eu", "eu-2"],  # after a welcome, one drop: the region's next edge
    ]
    assert result["round"] == ["a", "b", "c", "a", "b"]  # a plain list: as before
    assert result["refused"] == ["TypeError"] * 4
    assert result["preferred"] == ["us", ["us-1", "eu-1", "eu-2"]]
    assert result["ranked"] == ["eu", "us", "ap", "sa"]
    assert result["probe"] == "https://edge.example:8443/healthz"
    assert result["fromUrl"] == [["", ["ws://edge.example/v1/signal"]]]  # a URL object: as before


FALLBACK_JS = """
async () => {
  const { sdk, FakeSocket, until } = window.fake;
  const dead = new Set(['ws://eu-1/v1/signal', 'ws://eu-2/v1/signal']);
  FakeSocket.onsend = (ws, f) => {
    if (f.type !== 'hello') return;
    if (dead.has(ws.url)) { ws.drop(1006); return; }
    ws.push({ type: 'welcome', session: 's1', user: 'u1', resume: 'R1',
              resumed: f.resume === 'R1', ice_servers: [], heartbeat: 25 });
  };
  const client = new sdk.SignalpostClient({
    url: { eu: ['ws://eu-1/v1/signal', 'ws://eu-2/v1/signal'], us: ['ws://us-1/v1/signal'] },
    getToken: async () => 'jwt', WebSocket: FakeSocket, backoff: { initial: 5, maximum: 20 } });
  const resumed = [];
  client.on('resumed', (d) => resumed.push([d.session, d.resumed]));
  await client.connect();
  const first = client.region;
  // The us region goes whole; eu is back: the session resumes there.
  dead.clear();
  dead.add('ws://us-1/v1/signal');
  FakeSocket.all[FakeSocket.all.length - 1].drop(1006);
  await until(() => client.state === 'open' && resumed.length === 1);
  const result = { first, region: client.region, resumed, urls: FakeSocket.all.map((s) => s.url),
                   resumeHello: FakeSocket.all[FakeSocket.all.length - 1].sent[0] };
  client.close();
  return result;
}
"""


def test_sdk_falls_back_region_by_region_and_resumes_in_the_next(
    sdk_page: Any,  # noqa: F811
) -> None:
    result = sdk_page.evaluate(FALLBACK_JS)
    assert result["first"] == "us"  # every eu edge refused: the next region
    assert result["urls"] == [
        "ws://eu-1/v1/signal",
        "ws://eu-2/v1/signal",
        "ws://us-1/v1/signal",
        "ws://eu-1/v1/signal",  # us (one edge) dropped: back to eu
    ]
    assert result["region"] == "eu"
    assert result["resumeHello"]["resume"] == "R1"
    assert result["resumed"] == [["s1", True]]


FAKE_FETCH_JS = """
async ({ nearest }) => {
  const { sdk, FakeSocket } = window.fake;
  FakeSocket.onsend = (ws, f) => {
    if (f.type === 'hello') ws.push({ type: 'welcome', session: 's1', user: 'u1', resume: 'R',
      resumed: false, ice_servers: [], heartbeat: 25 });
  };
  FakeSocket.all.length = 0;
  const delays = { 'eu.example': 80, 'us.example': 5, 'ap.example': null };
  const probed = [];
  const fetch = (url, init) => new Promise((resolve, reject) => {
    const host = new URL(url).hostname;
    probed.push(url);
    const abort = () => reject(new Error('abort'));
    if (delays[host] === null) return init.signal.addEventListener('abort', abort);
    setTimeout(() => resolve({ status: 0 }), delays[host]);
  });
  const client = new sdk.SignalpostClient({
    url: { ap: ['ws://ap.example/v1/signal'], eu: ['ws://eu.example/v1/signal'],
           us: ['ws://us.example/v1/signal'] },
    token: 'jwt', WebSocket: FakeSocket, fetch, nearest, probeSamples: 2, probeTimeout: 200 });
  const started = performance.now();
  await client.connect();
  const result = { region: client.region, rtts: client.regionRtts, probed: probed.length,
                   took: performance.now() - started, url: FakeSocket.all[0].url };
  client.close();
  return result;
}
"""


def test_sdk_with_nearest_tries_the_region_with_the_shortest_round_trip_first(
    sdk_page: Any,  # noqa: F811
) -> None:
    result = sdk_page.evaluate(FAKE_FETCH_JS, {"nearest": True})
    assert result["region"] == "us" and result["url"] == "ws://us.example/v1/signal"
    rtts = result["rtts"]
    assert rtts["ap"] is None and rtts["eu"] >= 80 > rtts["us"]
    assert result["probed"] == 6  # 2 samples x 3 regions
    assert result["took"] < 2000  # bounded: probeTimeout per sample, regions at once
    plain = sdk_page.evaluate(FAKE_FETCH_JS, {"nearest": False})
    assert (plain["region"], plain["probed"]) == ("ap", 0)  # the given order, no probes


@pytest.fixture
def slow_copy(dev_server: str) -> Iterator[str]:  # noqa: F811
    """The dev server again behind ``signalpost wan-relay`` holding bytes 60 ms each way."""
    listen = free_port()
    port = dev_server.rsplit(":", 1)[1]
    relay = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "signalpost.cli",
            "wan-relay",
            "--delay",
            "60ms",
            "--pair",
            f"127.0.0.1:{listen}=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", listen), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the relay did not start"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{listen}"
    finally:
        relay.terminate()
        relay.wait(10)


REAL_JS = """
async ({ far, near }) => {
  const { sdk } = window.fake;
  const token = await (await fetch('/v1/dev-token?user=alice')).json();
  const client = new sdk.SignalpostClient({
    url: { far: [far.replace('http', 'ws') + '/v1/signal'],
           near: [near.replace('http', 'ws') + '/v1/signal'] },
    token: token.token, nearest: true });
  const welcome = await client.connect();
  const result = { region: client.region, rtts: client.regionRtts, session: welcome.session };
  client.close();
  return result;
}
"""


def test_sdk_picks_the_nearer_of_two_real_edges(
    sdk_page: Any,  # noqa: F811
    dev_server: str,  # noqa: F811
    slow_copy: str,
) -> None:
    result = sdk_page.evaluate(REAL_JS, {"far": slow_copy, "near": dev_server})
    assert result["region"] == "near" and result["session"]
    rtts = result["rtts"]
    assert rtts["near"] is not None and rtts["far"] is not None
    assert rtts["far"] >= 120 > rtts["near"]
