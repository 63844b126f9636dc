"""Fixtures for integration tests: a real dev-mode edge on port 0, in this event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from edge.backplane import LocalBackplane
from edge.server import EdgeServer
from signalpost.config import load_settings
from tests.helpers import SECRET, close_raw_clients

DevFactory = Callable[..., Awaitable[EdgeServer]]


@pytest.fixture
async def dev_factory() -> AsyncIterator[DevFactory]:
    """Start dev-mode servers with setting overrides; all are closed at teardown."""
    servers: list[EdgeServer] = []

    async def start(**overrides: Any) -> EdgeServer:
        settings = load_settings(
            environ={}, jwt_secret=SECRET, host="127.0.0.1", port=0, **overrides
        )
        server = EdgeServer(settings, LocalBackplane(settings), edge_id="dev")
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def dev(dev_factory: DevFactory) -> EdgeServer:
    """A dev-mode server with default settings."""
    return await dev_factory()


@pytest.fixture(autouse=True)
async def _close_raw_clients() -> AsyncIterator[None]:
    yield
    await close_raw_clients()
