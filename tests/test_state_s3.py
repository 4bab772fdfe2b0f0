"""The S3 state store (daemon/state_s3.py) against moto's S3 server: read whole and claimed at
takeover, saved only with If-Match, a deposed leader's late write refused.

moto 5.2.6's server honours If-Match and If-None-Match on PutObject (412 when they fail),
which is what these tests prove. It does not serialise two racing puts (no lock) and
never answers 409; S3's documented behaviour covers those (docs/ha.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import boto3  # type: ignore[import-untyped]  # moto's dependency; no stubs installed
import pytest
from structlog.testing import capture_logs

from daemon.logwatch.config import LeakWatchConfig, S3Location
from daemon.metrics import Metrics
from daemon.state import StateUnreadable, encode
from daemon.state_s3 import IAM_ACTIONS, S3StateStore
from tests.logwatch.aws_fakes import AWS_ENV, moto_server

BUCKET = "selfcheckd-state-123456789012"
WHERE = S3Location(BUCKET, "leakwatch-state.json")
DOC = {"detector": {"senders": [], "reported": ["6ANJUQna010773 a@sinkhole.test"]},
       "outbox": [], "queue": {"messages": []}}


@pytest.fixture(scope="module")
def moto_base() -> Iterator[str]:
    yield from moto_server()


@pytest.fixture
async def s3(moto_base: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh moto with the state bucket, versioned as deploy/ makes it; a boto3 client."""
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    async with aiohttp.ClientSession() as session, session.post(
            f"{moto_base}/moto-api/reset", timeout=aiohttp.ClientTimeout(total=10)) as resp:
        assert resp.status == 200
    client = boto3.client("s3", endpoint_url=moto_base, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    client.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    client.url = moto_base
    return client


OPEN: list[S3StateStore] = []


@pytest.fixture(autouse=True)
async def _close_stores() -> Any:
    """Every store a test made has its client closed at the end."""
    yield
    while OPEN:
        await OPEN.pop().close()


def store(s3: Any, metrics: Metrics | None = None, holder: str | None = "task-a#1-aa",
          token: int | None = 1) -> S3StateStore:
    made = S3StateStore(WHERE, metrics or Metrics(), endpoint_url=s3.url, region="us-east-1",
                        holder=holder, token=token)
    OPEN.append(made)
    return made


def current(s3: Any) -> tuple[dict[str, Any], dict[str, str]]:
    answer = s3.get_object(Bucket=BUCKET, Key=WHERE.key)
    return json.loads(answer["Body"].read()), answer["Metadata"]


def saves(metrics: Metrics, result: str) -> float:
    return metrics.registry.get_sample_value("selfcheckd_state_saves_total",
                                             {"result": result}) or 0.0


async def test_first_takeover_creates_the_object_and_saves_on_its_etag(s3: Any) -> None:
    """No object yet: load() is None, the claim creates it (If-None-Match) under our fence,
    saves follow with If-Match; the document and the metadata name the writer."""
    a = store(s3)
    await a.fetch(timeout=10)
    assert a.load() is None
    body, meta = current(s3)
    assert body == {"version": 2, "fence": {"holder": "task-a#1-aa", "token": 1}}
    assert meta == {"selfcheckd-holder": "task-a#1-aa", "selfcheckd-token": "1"}
    assert await a.save({**DOC, "fence": a.fence()}, timeout=10)
    body, _ = current(s3)
    assert body["detector"] == DOC["detector"]
    assert await a.save(encode({**DOC, "fence": a.fence()}), timeout=10)  # bytes, as saving.py
    assert a.last_error is None


async def test_takeover_reads_whole_and_claims_under_the_new_token(s3: Any) -> None:
    """The second leader reads what the first saved, and writes it straight back under its
    own holder and token: the first one's ETag is no longer current."""
    a = store(s3)
    await a.fetch(timeout=10)
    await a.save({**DOC, "fence": a.fence()}, timeout=10)
    b = store(s3, holder="task-b#1-bb", token=2)
    await b.fetch(timeout=10)
    state = b.load()
    assert state is not None
    assert state.detector is not None
    assert state.detector.reported == ["6ANJUQna010773 a@sinkhole.test"]
    body, meta = current(s3)
    assert body["fence"] == {"holder": "task-b#1-bb", "token": 2}
    assert body["detector"] == DOC["detector"]
    assert meta["selfcheckd-token"] == "2"


async def test_a_deposed_leaders_late_write_is_refused_and_fences_it(s3: Any) -> None:
    """After the new leader's claim, the old leader's save is refused (412), counted as
    fenced, reported once to on_fenced; the object stays the new leader's; later saves of
    the old one are refused without a request."""
    metrics = Metrics()
    a = store(s3, metrics)
    await a.fetch(timeout=10)
    told: list[str] = []
    a.on_fenced = told.append
    b = store(s3, holder="task-b#1-bb", token=2)
    await b.fetch(timeout=10)
    assert await b.save({**DOC, "fence": b.fence()}, timeout=10)
    with capture_logs() as logs:
        assert not await a.save({"outbox": [], "fence": a.fence()}, timeout=10)
        assert not await a.save({"outbox": [], "fence": a.fence()}, timeout=10)
    assert saves(metrics, "fenced") == 2
    assert saves(metrics, "failed") == 0
    assert told == ["written by task-b#1-bb under token 2 (ours: 1)"]
    assert [e["event"] for e in logs].count("state_save_refused") == 1
    body, _ = current(s3)
    assert body["fence"]["holder"] == "task-b#1-bb"
    assert body["detector"] == DOC["detector"]


async def test_our_own_write_whose_answer_was_lost_is_adopted(s3: Any) -> None:
    """A save went through but we kept the old ETag (its answer was lost): the next save's
    412 is ours, seen in the metadata, and it is written on the new ETag."""
    metrics = Metrics()
    a = store(s3, metrics)
    await a.fetch(timeout=10)
    stale = a.etag
    assert await a.save({**DOC, "fence": a.fence()}, timeout=10)
    a.etag = stale  # as if the answer of that save never came
    with capture_logs() as logs:
        assert await a.save({"outbox": [], "fence": a.fence()}, timeout=10)
    assert any(e["event"] == "state_object_adopted" for e in logs)
    assert a.fenced is None
    assert saves(metrics, "fenced") == 0
    assert current(s3)[0]["outbox"] == []


async def test_an_unusable_object_is_kept_as_a_version_and_the_watcher_starts_afresh(
        s3: Any) -> None:
    """Not JSON: load() is None with one warning naming the version it stays as; the claim
    writes an empty state over it; the old version can still be read."""
    put = s3.put_object(Bucket=BUCKET, Key=WHERE.key, Body=b"{not json")
    a = store(s3)
    with capture_logs() as logs:
        await a.fetch(timeout=10)
        assert a.load() is None
    (warning,) = [e for e in logs if e["event"] == "state_file_quarantined"]
    assert warning["kept_as_version"] == put["VersionId"]
    assert current(s3)[0] == {"version": 2, "fence": {"holder": "task-a#1-aa", "token": 1}}
    old = s3.get_object(Bucket=BUCKET, Key=WHERE.key, VersionId=put["VersionId"])
    assert old["Body"].read() == b"{not json"


async def test_a_claim_that_races_another_writer_reads_again(s3: Any) -> None:
    """Someone writes between our read and our claim: the claim is refused and we read
    again, so we take what they wrote, not what we read first."""
    s3.put_object(Bucket=BUCKET, Key=WHERE.key, Body=encode({"outbox": []}))
    a = store(s3)
    real_read = a._read
    reads = 0

    async def read_then_race(client: Any) -> bytes | None:
        nonlocal reads
        reads += 1
        document = await real_read(client)
        if reads == 1:
            s3.put_object(Bucket=BUCKET, Key=WHERE.key, Body=encode(DOC))
        return document

    a._read = read_then_race  # type: ignore[method-assign]
    await a.fetch(timeout=10)
    assert reads == 2
    state = a.load()
    assert state is not None and state.detector is not None
    assert state.detector.reported == DOC["detector"]["reported"]


async def test_saves_before_the_state_was_read_are_refused(s3: Any) -> None:
    """Nothing is written over a state that was not read (it would be lost)."""
    metrics = Metrics()
    a = store(s3, metrics)
    assert not await a.save({"outbox": []}, timeout=5)
    assert saves(metrics, "failed") == 1
    with pytest.raises(StateUnreadable):
        a.load()
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET)


async def test_unreachable_s3_is_unreadable_within_the_deadline(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens: fetch raises StateUnreadable naming the object, in time."""
    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    a = S3StateStore(WHERE, Metrics(), endpoint_url="http://127.0.0.1:9", region="us-east-1")
    OPEN.append(a)
    with pytest.raises(StateUnreadable) as error:
        await a.fetch(timeout=3)
    assert str(error.value).startswith(f"{WHERE}: ")


async def test_the_sdk_endpoint_variable_for_s3_is_followed(
        s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_ENDPOINT_URL_S3 (botocore's standard setting) reaches moto without endpoint_url."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.url)
    a = S3StateStore(WHERE, Metrics(), region="us-east-1", holder="h#1-x", token=3)
    OPEN.append(a)
    await a.fetch(timeout=10)
    assert current(s3)[1]["selfcheckd-token"] == "3"


async def test_a_stores_life_calls_only_what_the_task_role_grants(s3: Any) -> None:
    """Fetch (with a claim race), saves, a refused save and its HeadObject: the operations
    sent map onto daemon.state_s3.IAM_ACTIONS (HeadObject is s3:GetObject)."""
    from daemon import state_s3

    called: set[str] = set()
    real = state_s3.create_s3_client

    def recording(*args: Any, **kwargs: Any) -> Any:
        client = real(*args, **kwargs)

        class Wrapped:
            async def __aenter__(self) -> Any:
                entered = await client.__aenter__()
                entered.meta.events.register(
                    "before-call.s3", lambda model, **_: called.add(model.name))
                return entered

            async def __aexit__(self, *exc: Any) -> Any:
                return await client.__aexit__(*exc)

        return Wrapped()

    state_s3.create_s3_client = recording  # type: ignore[assignment]
    try:
        a = store(s3)
        await a.fetch(timeout=10)
        stale = a.etag
        await a.save({"outbox": []}, timeout=10)
        a.etag = stale
        await a.save({"outbox": []}, timeout=10)
    finally:
        state_s3.create_s3_client = real  # type: ignore[assignment]
    as_iam = {"GetObject": "s3:GetObject", "HeadObject": "s3:GetObject",
              "PutObject": "s3:PutObject"}
    assert called == {"GetObject", "HeadObject", "PutObject"}
    assert {as_iam[c] for c in called} == set(IAM_ACTIONS)


def test_state_file_takes_an_s3_url() -> None:
    """`state_file = "s3://bucket/key"` is an S3 location; a bad bucket or a prefix is one
    line naming the key and the rule."""
    from pydantic import ValidationError

    cfg = LeakWatchConfig.model_validate({"state_file": f"s3://{BUCKET}/a/state.json"})
    assert cfg.state_s3 == S3Location(BUCKET, "a/state.json")
    assert cfg.state_path is None
    assert str(cfg.state_s3) == f"s3://{BUCKET}/a/state.json"
    for bad, rule in (("s3://Bad_Bucket/k", "is not an S3 bucket name"),
                      (f"s3://{BUCKET}/", "give the object's key, not a prefix")):
        with pytest.raises(ValidationError) as error:
            LeakWatchConfig.model_validate({"state_file": bad})
        assert rule in str(error.value)


async def test_connect_check_heads_the_state_object(s3: Any, tmp_path: Any) -> None:
    """`config-check --connect`: no object yet is fine (the first leader creates it); once
    written, its size and writer; nothing is written by the check."""
    from tests.test_connect_check import connect_check, make

    log = tmp_path / "maillog"
    log.write_text("")
    config = make(leakwatch={"source": "file", "file": {"path": str(log)},
                             "state_file": str(WHERE)},
                  ha={"lease_table": "selfcheckd-lease", "endpoint_url": s3.url,
                      "region": "us-east-1"})
    report = await connect_check(config)
    status, detail, _ = report.line("stateobject")
    assert (status, detail) == (
        "ok", f"{WHERE} via {s3.url} (HeadObject: no state yet (the first leader creates it))")
    a = store(s3, holder="task-a#1-aa", token=4)
    await a.fetch(timeout=10)
    detail = (await connect_check(config)).line("stateobject")[1]
    assert detail.endswith("(HeadObject: 56 bytes, written by task-a#1-aa (token 4))")
    assert len(s3.list_object_versions(Bucket=BUCKET)["Versions"]) == 1


async def test_one_daemon_without_ha_keeps_its_state_in_s3(
        s3: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """No [ha]: the daemon reads the S3 state at start (leakwatch-state), alerts, saves under
    its own holder id; a second start resumes from it (no second alert for the same leak)."""
    from daemon.app import Daemon
    from daemon.config import Config, LoadedConfig
    from tests.logwatch.receiver import alert_sink
    from tests.logwatch.test_watcher import append, leak_line
    from tests.waiting import until

    log = tmp_path / "maillog"
    log.write_text("")
    async with alert_sink() as sink:
        tree = {"server": {"listen": "127.0.0.1:0"}, "shutdown_grace": 3,
                "leakwatch": {"source": "file", "file": {"path": str(log),
                                                         "poll_interval": 0.05},
                              "state_file": str(WHERE), "allowed_senders": ["qp-test@*"],
                              "alert": {"url": sink.url, "backoff": 0.1}}}
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.url)  # no [ha]: the SDK's setting

        async def one_run(first: bool) -> None:
            daemon = Daemon(LoadedConfig(Config.model_validate(tree), None))
            await daemon.start()
            value = daemon.metrics.registry.get_sample_value
            try:
                await until(lambda: daemon.leakwatch is not None and daemon.leakwatch.opened,
                            timeout=15)
                await until(lambda: value("leakwatch_last_poll_success_timestamp_seconds"),
                            timeout=10)
                append(log, leak_line("HAaa0004000004", "once@sinkhole.test"))
                if first:
                    await until(lambda: len(sink.accepted) == 1, timeout=10)
                else:  # the same leak again: the detector's memory came back from S3
                    await until(lambda: value("maillog_lines_total", {"kind": "to"}),
                                timeout=10)
            finally:
                await daemon.shutdown()

        await one_run(first=True)
        await one_run(first=False)
        assert len(sink.accepted) == 1
    body, _ = current(s3)
    assert body["fence"]["token"] is None
    assert "#" in body["fence"]["holder"]
    assert body["detector"]["reported"] == ["HAaa0004000004 once@sinkhole.test"]
