"""Fixtures shared by every test tier."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.coturn import Coturn, run_coturn

#: The secret coturn accepted before a rotation, and the one signalpost issues with now.
TURN_SECRET_OLD = "turn-secret-old-0123456789"
TURN_SECRET_NEW = "turn-secret-new-0123456789"


@pytest.fixture(scope="session")
def turnserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    """One real coturn for the session, accepting both rotation secrets."""
    with run_coturn(
        tmp_path_factory.mktemp("coturn"), (TURN_SECRET_OLD, TURN_SECRET_NEW)
    ) as server:
        yield server
