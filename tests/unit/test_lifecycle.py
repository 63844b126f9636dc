"""Long-lived tasks: one that ends with an error says so at once."""

from __future__ import annotations

import asyncio

import pytest

from signalpost.lifecycle import cancel_all, spawn


async def test_a_spawned_task_that_fails_is_logged_and_a_cancelled_one_is_not(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("the loop body broke")

    async def runs() -> None:
        await asyncio.sleep(3600)

    failing = spawn(fails(), "heartbeat tcp://x")
    running = spawn(runs(), "watch")
    with pytest.raises(ValueError):
        await failing
    await asyncio.sleep(0)  # done callbacks run on the next turn
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert [r.getMessage() for r in errors] == ["task heartbeat tcp://x ended with an error"]
    assert errors[0].exc_info is not None and isinstance(errors[0].exc_info[1], ValueError)
    await cancel_all([running])
    await asyncio.sleep(0)
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1
