"""Is an edge responsive? One session pings it every ``--every`` seconds and reports the
round trips (p50, p99, max) and the pings that got no pong within ``--timeout``.

    python -m load.probe ws://127.0.0.1:8080/v1/signal --seconds 60 --secret "$SECRET"

Run beside a Locust reconnect storm (load/README.md) against the edge that takes the
storm: its frames are served on the same event loop as the storm's hellos.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time

from websockets.asyncio.client import connect

from signalpost.auth import mint_token


async def probe(url: str, secret: str, seconds: float, every: float, timeout: float) -> dict:
    token = mint_token(secret, "probe", now=time.time(), ttl=3600.0)
    async with connect(url, compression=None) as ws:
        await ws.send(json.dumps({"type": "hello", "token": token}))
        welcome = json.loads(await ws.recv())
        assert welcome["type"] == "welcome", welcome
        rtts: list[float] = []
        missed = 0
        end = time.monotonic() + seconds
        n = 0
        while time.monotonic() < end:
            n += 1
            started = time.perf_counter()
            await ws.send(json.dumps({"type": "ping", "id": n}))
            try:
                async with asyncio.timeout(timeout):
                    while json.loads(await ws.recv()).get("id") != n:
                        pass
                rtts.append((time.perf_counter() - started) * 1000.0)
            except TimeoutError:
                missed += 1
            await asyncio.sleep(every)
    ordered = sorted(rtts)
    return {
        "pings": n,
        "missed": missed,
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
        "max_ms": round(ordered[-1], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--secret", default=os.environ.get("SIGNALPOST_JWT_SECRET", ""))
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--every", type=float, default=0.1)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()
    result = asyncio.run(probe(args.url, args.secret, args.seconds, args.every, args.timeout))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
