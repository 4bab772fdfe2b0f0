"""Fixtures for the drill and sinkhole tests: moto's server and AWS test credentials."""

from __future__ import annotations

from collections.abc import Iterator

import aiohttp
import pytest

from tests.logwatch.aws_fakes import AWS_ENV, moto_server


@pytest.fixture(scope="module")
def moto_base() -> Iterator[str]:
    yield from moto_server()


@pytest.fixture
async def moto_url(moto_base: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A freshly reset moto server and fake credentials in the environment."""
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    async with aiohttp.ClientSession() as session, session.post(
        f"{moto_base}/moto-api/reset", timeout=aiohttp.ClientTimeout(total=10)
    ) as resp:
        assert resp.status == 200
    return moto_base
