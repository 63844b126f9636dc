"""Benchmarks of signalpost, each a ratio measured side by side in one run.

    bench.run            one command: starts every system under test, drives each
                         scenario, samples server CPU/RSS, writes docs/performance.md
    bench.systems        starts/stops the systems under test (signalpost dev, signalpost
                         cluster, the relay floor, the Socket.IO baseline) and measures
                         their processes (CPU time user+system, RSS) with psutil
    bench.loadgen        the load generator, always its own process: one asyncio loop
                         speaking the real client protocol (or Socket.IO's framing over
                         the same WebSocket library) for the relay, call-setup, fan-out
                         and idle-connection workloads
    bench.floor_relay    the relay floor F: the least a websockets relay can do
    bench.broker_bench   RoomTable (pure core) and a real broker process over ZeroMQ
    bench.report         turns the results into markdown tables and PNG plots
    bench/socketio/      the classic Node Socket.IO signaling server (baseline)

Throughput from a Python generator on two shared cores says as much about the generator
as about the server, so every scenario also reports server CPU time per relayed message
(or per call) and compares those.
"""
