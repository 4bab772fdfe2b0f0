"""Resident memory of `selfcheckd run` after start-up and after N round trips.

The daemon runs in-process against the embedded stack (which shares the process,
so the numbers include pymap and aiosmtpd). Usage:
    .venv/bin/python bench/soak_memory.py [RUNS]
"""

from __future__ import annotations

import asyncio
import sys
import time

from daemon.app import Daemon
from daemon.config import Config, LoadedConfig
from daemon.embedded.stack import EmbeddedMailStack


def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def main(runs: int) -> None:
    async with EmbeddedMailStack() as stack:
        config = Config.model_validate({
            "selfcheck": {"interval": 0.01, "timeout": 5, "secret": "bench",
                          "routes": [stack.route_table()]},
            "server": {"listen": "127.0.0.1:0"},
        })
        daemon = Daemon(LoadedConfig(config, None))
        await daemon.start()
        counter = daemon.metrics.runs.labels("default", "success")
        while counter._value.get() < 1:
            await asyncio.sleep(0.01)
        start_rss = rss_mib()
        started = time.monotonic()
        while counter._value.get() < runs:
            await asyncio.sleep(0.05)
        elapsed = time.monotonic() - started
        end_rss = rss_mib()
        tasks = len(asyncio.all_tasks())
        await daemon.shutdown()
    print(f"runs={runs} rss_after_startup_mib={start_rss:.1f} rss_after_runs_mib={end_rss:.1f} "
          f"runs_per_second={runs / elapsed:.1f} tasks={tasks}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 500))
