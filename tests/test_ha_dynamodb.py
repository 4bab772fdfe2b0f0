"""The lease's DynamoDB calls against moto's DynamoDB server: the condition expressions hold.

What moto proves here: the conditions (absent or expired to take, holder and token to
renew, holder to release), ADD on the token, ALL_OLD on a failed condition, and the
errors a missing table gives. What it cannot prove: that two writes racing for one item
are serialised. moto checks a condition and writes without a lock, one request thread
each; DynamoDB documents conditional writes as atomic per item, and that is relied on.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import boto3  # type: ignore[import-untyped]  # moto's dependency; no stubs installed
import pytest

from daemon.config import HaConfig
from daemon.ha import DynamoLeaseTable, LeaseError, LeaseLostError, LeaseTakenError
from tests.logwatch.aws_fakes import AWS_ENV, moto_server

TABLE = "selfcheckd-lease"


@pytest.fixture(scope="module")
def moto_base() -> Iterator[str]:
    yield from moto_server()


@pytest.fixture
async def moto_url(moto_base: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    async with aiohttp.ClientSession() as session, session.post(
            f"{moto_base}/moto-api/reset", timeout=aiohttp.ClientTimeout(total=10)) as resp:
        assert resp.status == 200
    return moto_base


def create_lease_table(endpoint: str, name: str = TABLE) -> None:
    """The table as deploy/ creates it: one string hash key `key`, on demand."""
    client = boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-east-1")
    client.create_table(TableName=name, BillingMode="PAY_PER_REQUEST",
                        KeySchema=[{"AttributeName": "key", "KeyType": "HASH"}],
                        AttributeDefinitions=[{"AttributeName": "key", "AttributeType": "S"}])
    client.update_time_to_live(TableName=name, TimeToLiveSpecification={
        "Enabled": True, "AttributeName": "ttl"})


@pytest.fixture
async def table(moto_url: str) -> AsyncIterator[DynamoLeaseTable]:
    create_lease_table(moto_url)
    lease = DynamoLeaseTable(HaConfig(lease_table=TABLE, endpoint_url=moto_url,
                                      lease_duration=3, renew_every=1))
    async with lease.opened():
        yield lease


async def test_conditions_take_renew_and_release_like_the_lease_needs(
        table: DynamoLeaseTable) -> None:
    """Absent: taken (token 1). Held and unexpired: refused with the holder. Expired: taken
    (token 2). Renew: only holder and token. Release: only the holder; the token stays."""
    now = 1_800_000_000.0
    assert await table.acquire("a#1-x", now + 15, now) == 1
    with pytest.raises(LeaseTakenError) as taken:
        await table.acquire("b#2-y", now + 20, now + 5)
    assert taken.value.record is not None
    assert (taken.value.record.holder, taken.value.record.token) == ("a#1-x", 1)
    assert taken.value.record.expires == pytest.approx(now + 15)
    await table.renew("a#1-x", 1, now + 30)
    with pytest.raises(LeaseTakenError):
        await table.acquire("b#2-y", now + 40, now + 20)  # renewed: not expired at +20
    assert await table.acquire("b#2-y", now + 46, now + 31) == 2  # expired at +30
    with pytest.raises(LeaseLostError) as lost:
        await table.renew("a#1-x", 1, now + 50)
    assert lost.value.record is not None
    assert lost.value.record.holder == "b#2-y"
    with pytest.raises(LeaseLostError):
        await table.renew("b#2-y", 1, now + 50)  # our holder, an old token
    assert await table.release("a#1-x") is False
    assert await table.release("b#2-y") is True
    record = await table.read()
    assert record is not None
    assert (record.holder, record.token) == (None, 2)
    assert await table.acquire("a#1-x", now + 60, now + 45) == 3  # released: free at once


async def test_the_item_carries_a_ttl_a_week_past_its_expiry(
        table: DynamoLeaseTable, moto_url: str) -> None:
    """The TTL attribute lets DynamoDB remove a lease nobody held for a week, never sooner."""
    now = 1_800_000_000.0
    await table.acquire("a#1-x", now + 15, now)
    client = boto3.client("dynamodb", endpoint_url=moto_url, region_name="us-east-1")
    item = client.get_item(TableName=TABLE, Key={"key": {"S": "selfcheckd"}})["Item"]
    assert int(item["ttl"]["N"]) == now + 15 + 7 * 86400
    assert float(item["expires"]["N"]) == now + 15


async def test_a_missing_table_is_an_error_with_its_own_reason(moto_url: str) -> None:
    """No table (the daemon never creates one): every call fails with reason no_table."""
    lease = DynamoLeaseTable(HaConfig(lease_table="nope-nope", endpoint_url=moto_url))
    async with lease.opened():
        with pytest.raises(LeaseError) as error:
            await lease.acquire("a#1-x", 15.0, 0.0)
    assert error.value.reason == "no_table"
    assert "ResourceNotFoundException" in str(error.value)


async def test_an_unreachable_endpoint_is_a_connection_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens: the call fails within the timeout, reason connection."""
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    lease = DynamoLeaseTable(HaConfig(lease_table=TABLE, endpoint_url="http://127.0.0.1:9",
                                      region="us-east-1"), timeout=1.0)
    async with lease.opened():
        with pytest.raises(LeaseError) as error:
            await asyncio.wait_for(lease.acquire("a#1-x", 15.0, 0.0), 5)
    assert error.value.reason == "connection"


async def test_no_region_is_an_error_when_the_client_is_made(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No region anywhere: opening the client fails with reason config (the keeper retries
    and says so; it does not crash)."""
    for var in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    lease = DynamoLeaseTable(HaConfig(lease_table=TABLE, endpoint_url="http://127.0.0.1:9"))
    with pytest.raises(LeaseError) as error:
        async with lease.opened():
            pass
    assert error.value.reason == "config"


async def test_the_sdk_endpoint_variables_are_followed_without_endpoint_url(
        moto_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_ENDPOINT_URL_DYNAMODB (botocore's standard setting) reaches moto: no [ha]
    endpoint_url is needed."""
    create_lease_table(moto_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the per-service one wins
    monkeypatch.setenv("AWS_ENDPOINT_URL_DYNAMODB", moto_url)
    lease = DynamoLeaseTable(HaConfig(lease_table=TABLE))
    async with lease.opened():
        assert await lease.acquire("a#1-x", 15.0, 0.0) == 1


async def test_connect_check_reads_the_lease_and_says_who_holds_it(
        table: DynamoLeaseTable, moto_url: str, tmp_path: Any) -> None:
    """`config-check --connect`: GetItem on the lease item: none yet, then held (holder,
    token, expiry), then free; nothing is written."""
    from tests.test_connect_check import connect_check, make

    log = tmp_path / "maillog"
    log.write_text("")
    config = make(leakwatch={"source": "file", "file": {"path": str(log)}},
                  ha={"lease_table": TABLE, "endpoint_url": moto_url, "region": "us-east-1"})
    label = f"lease {TABLE}/selfcheckd"
    report = await connect_check(config)
    assert report.ok, report.text
    assert report.line(label)[:2] == (
        "ok", f"{moto_url} (GetItem: table readable, no lease yet (the first task to start "
              "takes it))")
    now = time.time()
    await table.acquire("task-a#1-x", now + 15, now)
    status, detail, _ = (await connect_check(config)).line(label)
    assert status == "ok"
    assert re.search(r"\(GetItem: held by task-a#1-x, token 1, expires in 1[45]s\)$", detail)
    await table.release("task-a#1-x")
    detail = (await connect_check(config)).line(label)[1]
    assert detail.endswith("(GetItem: table readable, lease free (released), token 1)")
    record = await table.read()
    assert record is not None and record.token == 1  # read, never written


async def test_connect_check_fails_on_a_missing_lease_table(moto_url: str,
                                                            tmp_path: Any) -> None:
    """No table: one FAIL line naming it, saying how to create it and that the daemon won't."""
    from tests.test_connect_check import connect_check, make

    log = tmp_path / "maillog"
    log.write_text("")
    config = make(leakwatch={"source": "file", "file": {"path": str(log)}},
                  ha={"lease_table": "selfcheckd-missing", "endpoint_url": moto_url,
                      "region": "us-east-1"})
    report = await connect_check(config)
    assert not report.ok
    status, detail, _ = report.line("lease selfcheckd-missing/selfcheckd")
    assert status == "FAIL"
    assert detail == (f"{moto_url}: dynamodb:GetItem: table selfcheckd-missing not found: "
                      "create it (deploy/terraform, or docs/ha.md: one string hash key named "
                      "`key`); selfcheckd never creates tables")
    assert report.lines[-1] == "1 of 2 targets failed: lease selfcheckd-missing/selfcheckd"


async def test_a_leases_life_calls_only_the_actions_the_task_role_grants(
        table: DynamoLeaseTable, moto_url: str, tmp_path: Any) -> None:
    """Take, renew, release, and config-check's read: the operations botocore sent are
    exactly daemon.ha.IAM_ACTIONS (which tests/deploy/test_ecs.py holds the policy to)."""
    from daemon.ha import IAM_ACTIONS
    from tests.test_connect_check import connect_check, make

    called: set[str] = set()

    def record(model: Any, **_kw: Any) -> None:
        called.add(f"dynamodb:{model.name}")

    table.client.meta.events.register("before-call.dynamodb", record)
    now = time.time()
    await table.acquire("a#1-x", now + 15, now)
    await table.renew("a#1-x", 1, now + 30)
    await table.release("a#1-x")
    assert called == {"dynamodb:UpdateItem"}
    log = tmp_path / "maillog"
    log.write_text("")
    from daemon import connect_check as cc

    real = cc.create_dynamodb_client

    def recording(*args: Any, **kwargs: Any) -> Any:
        client = real(*args, **kwargs)

        class Wrapped:
            async def __aenter__(self) -> Any:
                entered = await client.__aenter__()
                entered.meta.events.register("before-call.dynamodb", record)
                return entered

            async def __aexit__(self, *exc: Any) -> Any:
                return await client.__aexit__(*exc)

        return Wrapped()

    cc.create_dynamodb_client = recording  # type: ignore[assignment]
    try:
        report = await connect_check(make(
            leakwatch={"source": "file", "file": {"path": str(log)}},
            ha={"lease_table": TABLE, "endpoint_url": moto_url, "region": "us-east-1"}))
    finally:
        cc.create_dynamodb_client = real  # type: ignore[assignment]
    assert report.ok, report.text
    assert called == set(IAM_ACTIONS)
