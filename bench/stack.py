"""`python -m bench.stack N`: N embedded mail stacks (aiosmtpd + pymap) in a process of their own.

Prints one JSON line, `{"routes": [...]}` (each a `[[selfcheck.routes]]` table), then serves
until its standard input closes. Running the stack apart keeps its memory and CPU out of the
selfcheckd process being measured.
"""

from __future__ import annotations

import asyncio
import json
import sys

from daemon.embedded.stack import EmbeddedMailStack, StackOptions


async def main(count: int) -> None:
    stacks = [await EmbeddedMailStack(StackOptions(
        recipient=f"selfcheck-{i}@selfcheckd.test", imap_user=f"user{i}")).start()
        for i in range(count)]
    routes = [s.route_table(f"r{i:02d}") for i, s in enumerate(stacks)]
    sys.stdout.write(json.dumps({"routes": routes}) + "\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin
    for s in stacks:
        await s.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1))
