"""The OpenAPI document against the live server: schemathesis generates requests from it
(valid and invalid) and checks every answer (status codes, content types, bodies against
the schemas, no 5xx, invalid input refused, valid input accepted, auth enforced).

A route, field, status code or constraint that the document and the server disagree on
fails this test. Runs schemathesis' CLI (a test dependency) against a dev-mode edge in
this event loop, with a member in the document's example room so examples reach it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from edge.server import EdgeServer
from signalpost.api_keys import ALL_SCOPES, mint_api_key
from tests.helpers import SECRET, raw_client, url_of


async def test_the_openapi_document_matches_the_live_server(
    dev: EdgeServer, tmp_path: Path
) -> None:
    alice = await raw_client(url_of(dev), "alice")
    assert (await alice.request({"type": "join", "id": 1, "room": "lobby"}))["type"] == "joined"
    key = mint_api_key(SECRET, "schemathesis", ALL_SCOPES, now=time.time())
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"http://127.0.0.1:{dev.port}/v1/api/openapi.json",
        "--header",
        f"Authorization: Bearer {key}",
        "--checks",
        "all",
        "--max-examples",
        "25",
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--no-color",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 240)
    report = output.decode(errors="replace")
    assert process.returncode == 0, report[-6000:]
    assert "7 selected / 7 total" in report, report[-3000:]
