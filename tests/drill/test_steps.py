"""The drill engine against the in-memory cluster: verdicts, evidence, cleanup, signals."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from daemon.drill.journal import Journal
from daemon.drill.steps import Drill
from tests.drill.fakes import SMTP, FakeCluster, FakeLogs, FakeModes, ManualClock, drill_config


def make(tmp_path: Path, *, modes: FakeModes | None = None, cluster: FakeCluster | None = None,
         logs: bool = False, keep_going: bool = False, **cfg: Any) -> tuple[Drill, FakeCluster,
                                                                          FakeModes, io.StringIO]:
    modes = modes or FakeModes()
    cluster = cluster or FakeCluster(modes)
    clock = ManualClock()
    lines = io.StringIO()
    cfg.setdefault("lock_file", str(tmp_path / "drill.lock"))
    drill = Drill(drill_config(**cfg), SMTP, cluster, modes,
                  FakeLogs(cluster) if logs else None, keep_going=keep_going, lines=lines,
                  clock=clock, wall=clock.wall, sleep=clock.sleep, send=cluster.send,
                  drill_id="t1", hard_exit=lambda: hard_exits.append(1))
    return drill, cluster, modes, lines


hard_exits: list[int] = []


def step(journal: Journal, number: int) -> dict[str, Any]:
    return next(s for s in journal.as_dict()["steps"] if s["step"] == number)


async def test_shared_queue_passes_with_the_same_queue_id_before_and_after(
        tmp_path: Path) -> None:
    """On a shared queue the drill passes: one queue id on every task in steps 3 and 5
    (the replacement included), gone in step 8, exit 0, the sinkhole parked in defer."""
    drill, cluster, modes, lines = make(tmp_path)
    journal = await drill.run()
    assert journal.result == "passed", journal.error
    assert journal.exit_code == 0
    qid = journal.queue_id
    assert qid is not None
    before = step(journal, 3)["evidence"]["tasks"]
    after = step(journal, 5)["evidence"]["tasks"]
    assert {t: e["listed"] for t, e in before.items()} == {"task-1": [qid], "task-2": [qid]}
    replacement = step(journal, 4)["evidence"]["replacement"]
    assert replacement == ["task-3"]
    assert all(e["listed"] == [qid] for e in after.values()) and "task-3" in after
    assert any("Deferred: 421 4.3.2" in line for line in after["task-3"]["lines"])
    assert [m.qid for m in cluster.delivered] == [qid]
    assert step(journal, 7)["evidence"]["tried"] is True
    assert modes.mode == "defer" and journal.cleanup["ok"] is True
    assert len([ln for ln in lines.getvalue().splitlines() if ln.startswith("drill step")]) == 9


async def test_unshared_queues_fail_at_step_3_naming_the_task(tmp_path: Path) -> None:
    """Tasks that do not share the queue: step 3 fails with exit 1 naming the task that
    does not list the message; the sinkhole still ends in defer."""
    modes = FakeModes()
    drill, _cluster, _, lines = make(tmp_path, modes=modes,
                                    cluster=FakeCluster(modes, shared=False))
    journal = await drill.run()
    assert (journal.result, journal.exit_code, journal.failed_step) == ("failed", 1, "3 queued")
    assert "not listed by task(s) task-2" in (journal.error or "")
    assert modes.mode == "defer" and journal.cleanup["ok"] is True
    assert "step 3 queued: FAILED" in lines.getvalue()


async def test_queue_lost_at_replacement_fails_at_step_5(tmp_path: Path) -> None:
    """A replacement that starts with an empty queue fails step 5 (exit 1), naming it."""
    modes = FakeModes()
    drill, _, _, _ = make(tmp_path, modes=modes,
                          cluster=FakeCluster(modes, lose_queue_on_replacement=True))
    journal = await drill.run()
    assert (journal.exit_code, journal.failed_step) == (1, "5 survived")
    assert "not listed by task(s) task-3" in (journal.error or "")
    assert modes.mode == "defer"


# Debian's `mailq -C {task_dir}/sendmail.cf` before the task's start command wrote its cf.
MAILQ_NO_CF = ("MSP Queue status...\n/t/task-3/sendmail.cf: line 0: cannot open: No such file "
               "or directory\nMTA Queue status...\n/t/task-3/sendmail.cf: line 0: cannot open: "
               "No such file or directory\n")
MAILQ_NO_QUEUE = "MTA Queue status...\ncan not chdir(/var/spool/mqueue/): Permission denied\n"


async def test_a_replacement_whose_mailq_cannot_answer_yet_is_waited_for(
        tmp_path: Path) -> None:
    """A replacement whose mailq prints an error and exits 0 (Debian's wrapper, before the
    task wrote its cf) is no reading: step 5 polls until it answers and passes, never
    "not listed by task-3" (a false exit 1 on a healthy shared queue)."""
    modes = FakeModes()
    cluster = FakeCluster(modes)
    cluster.hooks["stop_task"] = lambda: cluster.mailq_says.update({"task-3": MAILQ_NO_CF})
    # Step 3 reads mailq twice, step 5's first poll twice (task-3's fails): the 6th call
    # (step 5's second poll of task-3) finds the task ready.
    cluster.hooks["mailq:6"] = lambda: cluster.mailq_says.clear()
    drill, _, _, _ = make(tmp_path, modes=modes, cluster=cluster)
    journal = await drill.run()
    assert journal.result == "passed", journal.error
    assert step(journal, 5)["evidence"]["tasks"]["task-3"]["listed"] == [journal.queue_id]


async def test_a_mailq_that_cannot_read_the_queue_is_not_a_drained_queue(
        tmp_path: Path) -> None:
    """After the flip every mailq prints an error (exit 0) and the message is in fact still
    queued: step 8 aborts (exit 3, no reading), never passes as "gone from every task"; the
    cleanup says it cannot tell whether the message is still queued."""
    modes = FakeModes()
    cluster = FakeCluster(modes)

    async def no_delivery(task: str) -> str:
        cluster.mailq_says.update(dict.fromkeys(cluster.queues, MAILQ_NO_QUEUE))
        return ""

    cluster.run_queue = no_delivery  # type: ignore[method-assign]
    drill, _, _, _ = make(tmp_path, modes=modes, cluster=cluster)
    journal = await drill.run()
    assert (journal.result, journal.exit_code, journal.failed_step) == (
        "aborted", 3, "8 drained")
    assert "gave no queue listing: MTA Queue status... can not chdir" in (journal.error or "")
    assert any(a.startswith("cannot tell whether it is still queued")
               for a in journal.cleanup["actions"])
    assert journal.cleanup["left"] and modes.mode == "defer"


async def test_failed_drill_drains_the_message_in_cleanup(tmp_path: Path) -> None:
    """When a step fails with the message still queued, the cleanup delivers it (accept,
    queue run) and parks in defer again."""
    modes = FakeModes()
    drill, cluster, _, _ = make(tmp_path, modes=modes,
                                cluster=FakeCluster(modes, lose_queue_on_replacement=True))
    journal = await drill.run()
    assert [m.recipient for m in cluster.delivered] == [drill.recipient]
    assert any(a.startswith("drained") for a in journal.cleanup["actions"])
    assert modes.writes[-2:] == ["accept", "defer"] and modes.mode == "defer"
    assert journal.cleanup["left"] == []


async def test_production_is_refused_before_anything_is_touched(tmp_path: Path) -> None:
    """environment = prod: exit 2, no mode read or written, no task touched."""
    drill, cluster, modes, _ = make(tmp_path, environment="prod")
    journal = await drill.run()
    assert (journal.result, journal.exit_code) == ("refused", 2)
    assert modes.writes == [] and cluster.calls == [] and journal.cleanup["ok"] is None


async def test_missing_harness_is_refused(tmp_path: Path) -> None:
    """No mode parameter means no sinkhole: exit 2 and the parameter is not created."""
    drill, _, modes, _ = make(tmp_path, modes=FakeModes(mode=None))
    journal = await drill.run()
    assert (journal.result, journal.exit_code) == ("refused", 2)
    assert "does not exist" in (journal.error or "") and modes.writes == []


async def test_unknown_mode_is_refused(tmp_path: Path) -> None:
    """A mode value the sinkhole does not know is refused (exit 2), nothing written."""
    drill, _, modes, _ = make(tmp_path, modes=FakeModes(mode="acept"))
    journal = await drill.run()
    assert journal.exit_code == 2 and modes.writes == []


async def test_sigterm_during_step_5_aborts_and_parks_in_defer(tmp_path: Path) -> None:
    """A signal during step 5: the steps stop, the cleanup parks in defer, exit 3,
    result aborted, the journal says which signal."""
    drill, cluster, modes, _ = make(tmp_path)
    # Step 3 reads mailq on two tasks; the third mailq call is step 5's first.
    cluster.hooks["mailq:3"] = lambda: drill.interrupt("SIGTERM")
    journal = await drill.run()
    assert (journal.result, journal.exit_code) == ("aborted", 3)
    assert journal.failed_step == "5 survived" and journal.interrupted_by == "SIGTERM"
    assert step(journal, 5)["ok"] is False
    assert modes.mode == "defer" and journal.cleanup["ok"] is True
    assert modes.writes == ["defer", "defer"]  # step 1's, then the cleanup's own
    assert journal.cleanup["actions"][0].startswith("parked in defer")
    assert journal.cleanup["left"]  # no drain after a signal: it says what was left
    assert cluster.closed


async def test_a_signal_is_not_lost_when_a_library_swallows_the_cancellation(
        tmp_path: Path) -> None:
    """A signal that arrives together with an SMTP reply still stops the drill (Python
    3.11's asyncio.wait_for, through which aiosmtplib reads every reply, then returns the
    reply and drops the cancellation): exit 3, aborted, no step after it runs."""
    import asyncio

    modes = FakeModes()
    cluster = FakeCluster(modes)
    drill, _, _, _ = make(tmp_path, modes=modes, cluster=cluster)
    submit = cluster.send

    async def send(*args: Any) -> str:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[str] = loop.create_future()
        loop.call_soon(reply.set_result, await submit(*args))
        loop.call_soon(drill.interrupt, "SIGTERM")  # in the same loop turn as the reply
        return await asyncio.wait_for(reply, 10)

    drill.send = send
    journal = await drill.run()
    assert (journal.result, journal.exit_code) == ("aborted", 3)
    assert journal.interrupted_by == "SIGTERM"
    assert [s["step"] for s in journal.as_dict()["steps"]][-1] <= 3
    assert ("stop_task", "task-1") not in cluster.calls and "accept" not in modes.writes
    assert modes.mode == "defer"


async def test_second_signal_during_cleanup_still_parks(tmp_path: Path) -> None:
    """A second signal while the cleanup drains cancels the drain, never the parking."""
    modes = FakeModes()
    drill, _, _, lines = make(tmp_path, modes=modes,
                              cluster=FakeCluster(modes, lose_queue_on_replacement=True))

    def on_write(mode: str) -> None:
        if mode == "accept" and drill._phase == "cleanup":
            drill.interrupt("SIGINT")
            drill.interrupt("SIGINT")

    modes.on_write = on_write
    hard_exits.clear()
    journal = await drill.run()
    assert modes.mode == "defer" and journal.cleanup["ok"] is True
    assert "drain skipped: interrupted" in journal.cleanup["actions"]
    assert hard_exits == []
    assert "the cleanup still parks the sinkhole in defer" in lines.getvalue()


async def test_third_signal_exits_at_once(tmp_path: Path) -> None:
    """A third signal during the cleanup calls the hard exit."""
    modes = FakeModes()
    drill, _, _, lines = make(tmp_path, modes=modes,
                              cluster=FakeCluster(modes, lose_queue_on_replacement=True))

    def on_write(mode: str) -> None:
        if mode == "accept" and drill._phase == "cleanup":
            for _ in range(3):
                drill.interrupt("SIGTERM")

    modes.on_write = on_write
    hard_exits.clear()
    await drill.run()
    assert hard_exits == [1]
    assert "exiting NOW" in lines.getvalue()


async def test_ssm_failing_at_step_6_aborts_and_cleanup_retries_until_defer(
        tmp_path: Path) -> None:
    """SSM failing from step 6 on: exit 3; the cleanup retries until defer reads back."""
    modes = FakeModes()
    modes.fail_writes_after = 1  # step 1's defer succeeds, step 6's accept fails
    modes.failures_left = 4
    drill, _, _, _ = make(tmp_path, modes=modes)
    journal = await drill.run()
    assert (journal.result, journal.exit_code, journal.failed_step) == ("aborted", 3, "6 flip")
    assert journal.cleanup["ok"] is True and modes.mode == "defer"
    attempts = [a for a in journal.cleanup["actions"] if a.startswith("parked in defer")]
    assert attempts and "attempt 1)" not in attempts[0]


async def test_ssm_down_for_good_exits_4_loudly(tmp_path: Path) -> None:
    """SSM never answering again: the cleanup gives up at cleanup_timeout, exit 4, said
    loudly on stderr and in the journal."""
    modes = FakeModes()
    modes.fail_writes_after = 1
    drill, _, _, lines = make(tmp_path, modes=modes, cleanup_timeout=60)
    journal = await drill.run()
    assert journal.exit_code == 4 and journal.cleanup["ok"] is False
    assert journal.metric_result == "cleanup_failed"
    assert "DRILL CLEANUP FAILED" in lines.getvalue()
    assert "aws ssm put-parameter --name /cabal/sinkhole_mode --value defer" in lines.getvalue()


async def test_a_signal_during_the_cleanups_retries_cuts_them_to_the_budget(
        tmp_path: Path) -> None:
    """SSM down from step 6 on, then SIGTERM while the cleanup retries its parking (for up
    to cleanup_timeout = 300 s): the retries stop within interrupt_budget of the signal,
    exit 4, never 300 s past ECS' 30 s."""
    modes = FakeModes()
    modes.fail_writes_after = 1
    drill, _, _, _ = make(tmp_path, modes=modes, cleanup_timeout=300)
    clock = drill.clock
    signalled: list[float] = []
    write = modes.write

    async def counting_write(mode: str) -> None:
        if drill._phase == "cleanup" and modes.calls == 3 and not signalled:
            signalled.append(clock())
            drill.interrupt("SIGTERM")
        await write(mode)

    modes.write = counting_write  # type: ignore[method-assign]
    journal = await drill.run()
    assert journal.exit_code == 4 and journal.cleanup["ok"] is False and signalled
    assert clock() - signalled[0] <= drill.cfg.interrupt_budget


async def test_a_hanging_ssm_cannot_hold_the_exit_past_the_budget(tmp_path: Path) -> None:
    """A blackholed SSM (every call hangs) and SIGTERM during step 6: each parking attempt
    is cut at the interrupt budget's deadline; the drill ends, exit 4, loudly."""
    import asyncio

    modes = FakeModes()
    modes.hang_from = 2  # step 1's defer is written; step 6's accept hangs, so does defer
    drill, _, _, lines = make(tmp_path, modes=modes, interrupt_budget=4)
    modes.on_hang = lambda: asyncio.get_running_loop().call_soon(drill.interrupt, "SIGTERM")
    async with asyncio.timeout(20):
        journal = await drill.run()
    assert (journal.exit_code, journal.failed_step) == (4, "6 flip")
    assert "DRILL CLEANUP FAILED" in lines.getvalue()


async def test_a_signal_cuts_a_hanging_parking_attempt_short(tmp_path: Path) -> None:
    """The cleanup after a failed step parks under cleanup_timeout (300 s); SSM hangs and a
    SIGTERM arrives during that attempt: the attempt is cut at the interrupt budget."""
    import asyncio

    modes = FakeModes()
    modes.hang_from = 2  # the cleanup's parking is the second write
    drill, _, _, _ = make(tmp_path, modes=modes, interrupt_budget=4, cleanup_timeout=300,
                          cluster=FakeCluster(modes, shared=False))
    modes.on_hang = lambda: asyncio.get_running_loop().call_soon(drill.interrupt, "SIGTERM")
    async with asyncio.timeout(20):
        journal = await drill.run()
    assert (journal.exit_code, journal.failed_step) == (4, "3 queued")


async def test_keep_going_checks_every_step_after_a_failure(tmp_path: Path) -> None:
    """--keep-going: a failed step 3 is recorded and steps 4-8 still run; exit 1."""
    modes = FakeModes()
    drill, _, _, _ = make(tmp_path, modes=modes, keep_going=True,
                          cluster=FakeCluster(modes, shared=False))
    journal = await drill.run()
    assert journal.exit_code == 1 and journal.failed_step == "3 queued"
    assert [s["step"] for s in journal.as_dict()["steps"]] == list(range(9))


async def test_without_exec_the_log_streams_are_the_evidence(tmp_path: Path) -> None:
    """Tasks without ECS Exec: steps 3, 5 and 8 read each task's log stream, the journal
    says so, and the queue run falls back to sendmail's own retry."""
    modes = FakeModes()
    cluster = FakeCluster(modes, exec_enabled=False)

    def retry_everywhere() -> None:  # sendmail's own queue runners, on every task
        for task in list(cluster.queues):
            for msg in list(cluster.queues[task].values()):
                cluster._attempt(task, msg)

    # Every task's runner retries once after the send and once after the replacement.
    cluster.hooks["wait_steady"] = retry_everywhere
    modes.on_write = lambda mode: retry_everywhere() if mode == "accept" else None
    original_send = cluster.send

    async def send(*args: Any) -> str:
        reply = await original_send(*args)
        retry_everywhere()
        return reply

    drill, _, _, _ = make(tmp_path, modes=modes, cluster=cluster, logs=True)
    drill.send = send
    journal = await drill.run()
    assert journal.result == "passed", journal.error
    assert step(journal, 3)["evidence"]["tasks"]["task-1"]["source"] == "log"
    assert step(journal, 7)["evidence"]["trigger"] == "wait"
    assert step(journal, 8)["evidence"]["log"]["sent"]


async def test_no_exec_and_no_log_source_aborts_at_preflight(tmp_path: Path) -> None:
    """Without ECS Exec and without a log source there is no evidence: exit 3 at step 0."""
    modes = FakeModes()
    drill, _, _, _ = make(tmp_path, modes=modes,
                          cluster=FakeCluster(modes, exec_enabled=False))
    journal = await drill.run()
    assert (journal.exit_code, journal.failed_step) == (3, "0 preflight")


async def test_a_second_delivered_copy_fails_step_8(tmp_path: Path) -> None:
    """Two stat=Sent lines for the drill's recipient (two copies delivered): exit 1."""
    modes = FakeModes()
    cluster = FakeCluster(modes)
    drill, _, _, _ = make(tmp_path, modes=modes, cluster=cluster, logs=True)

    def duplicate() -> None:
        cluster.log.append(cluster.log[-1].__class__(
            f"sendmail[2]: 6ANJUQna999999: to=<{drill.recipient}>, stat=Sent (ok)", "task-2"))

    cluster.hooks["run_queue"] = duplicate
    journal = await drill.run()
    assert (journal.exit_code, journal.failed_step) == (1, "8 drained")
    assert "delivered more than once" in (journal.error or "")


async def test_not_delivered_after_the_flip_fails_step_8(tmp_path: Path) -> None:
    """A queue run that leaves the message queued after the flip: step 8 fails, exit 1."""
    modes = FakeModes()
    cluster = FakeCluster(modes)

    async def no_delivery(task: str) -> str:
        return "nothing\n"

    cluster.run_queue = no_delivery  # type: ignore[method-assign]
    drill, _, _, _ = make(tmp_path, modes=modes, cluster=cluster)
    journal = await drill.run()
    assert (journal.exit_code, journal.failed_step) == (1, "8 drained")
    assert "still queued after the flip" in (journal.error or "")


async def test_a_queue_run_that_skips_the_message_is_named_as_the_cause(
        tmp_path: Path) -> None:
    """The issue's example queue run (`sendmail -q -v`, no -OMinQueueAge=0) on a cluster
    with MinQueueAge: the run ends without trying the message, which stays deferred.
    Step 7 says the run did not try it and step 8's failure names MinQueueAge and the
    fix, not only "still queued after the flip"; so does the drain."""
    modes = FakeModes()
    cluster = FakeCluster(modes)

    async def skipping_run(task: str) -> str:
        return ""  # what `sendmail -q -v` printed when MinQueueAge skipped the message

    cluster.run_queue = skipping_run  # type: ignore[method-assign]
    drill, _, _, _ = make(tmp_path, modes=modes, cluster=cluster)
    journal = await drill.run()
    assert (journal.exit_code, journal.failed_step) == (1, "8 drained")
    assert step(journal, 7)["evidence"]["tried"] is False
    assert "without trying" in step(journal, 7)["summary"]
    assert "did not try it" in (journal.error or "")
    assert "-OMinQueueAge=0" in (journal.error or "")
    assert any("which did not try it" in a for a in journal.cleanup["actions"])


async def test_another_drill_holding_the_lock_is_refused(tmp_path: Path) -> None:
    """Two drills never overlap: the second is refused (exit 2) while the first runs."""
    first, cluster, _modes, _ = make(tmp_path)
    second_journal: list[Journal] = []

    async def start_second() -> None:
        second, _, _, _ = make(tmp_path)
        second_journal.append(await second.run())

    import asyncio

    task: list[asyncio.Task[None]] = []
    cluster.hooks["stop_task"] = lambda: task.append(asyncio.create_task(start_second()))
    journal = await first.run()
    await task[0]
    assert journal.exit_code == 0
    assert second_journal[0].exit_code == 2
    assert "another drill is running" in (second_journal[0].error or "")


async def test_journal_is_json_with_every_step_and_no_secret(tmp_path: Path) -> None:
    """The journal serialises to JSON: id, config summary, each step's times/ok/evidence/
    error, result and cleanup; the SMTP password never appears."""
    drill, _, _, _ = make(tmp_path)
    journal = await drill.run()
    out = io.StringIO()
    journal.dump(out)
    data = json.loads(out.getvalue())
    assert data["id"] == "t1" and data["result"] == "passed"
    assert set(data["steps"][0]) >= {"name", "started", "ended", "ok", "evidence", "error"}
    assert data["cleanup"]["ok"] is True and data["exit_code"] == 0
    assert data["config"]["environment"] == "stage"
    assert any(c["call"] == "ssm:PutParameter" for c in data["steps"][1]["evidence"]["calls"])


async def test_each_flip_waits_out_the_mode_cache(tmp_path: Path) -> None:
    """Steps 1 and 6 wait mode_cache + 1 s after the mode reads back."""
    drill, _, _, _ = make(tmp_path, mode_cache=30)
    journal = await drill.run()
    assert step(journal, 1)["evidence"]["waited_for_mode_cache"] == 31
    assert step(journal, 6)["evidence"]["waited_for_mode_cache"] == 31


async def test_without_a_mode_cache_no_wait_is_claimed(tmp_path: Path) -> None:
    """mode_cache = 0: steps 1 and 6 neither wait nor say they waited."""
    drill, _, _, _ = make(tmp_path, mode_cache=0)
    journal = await drill.run()
    assert "waited_for_mode_cache" not in step(journal, 1)["evidence"]
    assert "waited" not in step(journal, 1)["summary"] + step(journal, 6)["summary"]
    assert "mode_cache = 0" in step(journal, 6)["summary"]


@pytest.mark.parametrize("env", ["prod", "Production", " PROD ", "prod-eu-west-1",
                                 "eu_prod", "prod2", "us-east-1.production", "live"])
def test_prod_spellings_are_refused(env: str) -> None:
    """Every spelling of production is refused, also as a word of a longer name."""
    assert drill_config(environment=env).refused


@pytest.mark.parametrize("env", ["stage", "staging", "preprod", "nonprod", "demo",
                                 "delivery-test"])
def test_other_environments_run(env: str) -> None:
    """Names that only contain the letters of prod or live are not production."""
    assert not drill_config(environment=env).refused
