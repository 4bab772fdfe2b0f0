"""The sinkhole's mode as the drill sets it: the SSM parameter, or a local listener's file."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from daemon.drill.config import DrillSinkhole
from daemon.drill.driver import DrillAbortedError, ModeStore


class SsmModeStore:
    """GetParameter / PutParameter --overwrite, each under one deadline."""

    def __init__(self, parameter: str, *, region: str | None = None,
                 endpoint_url: str | None = None, timeout: float = 10.0) -> None:
        self.parameter = parameter
        self.region = region
        self.endpoint_url = endpoint_url
        self.timeout = timeout
        self._exit: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    def describe(self) -> str:
        return f"ssm:{self.parameter}"

    async def _ssm(self) -> Any:
        if self._client is None:
            config = AioConfig(retries={"mode": "standard", "max_attempts": 2},
                               connect_timeout=min(self.timeout, 10.0),
                               read_timeout=self.timeout)
            self._exit = contextlib.AsyncExitStack()
            self._client = await self._exit.enter_async_context(get_session().create_client(
                "ssm", region_name=self.region, endpoint_url=self.endpoint_url, config=config))
        return self._client

    async def close(self) -> None:
        if self._exit is not None:
            exit_stack, self._exit, self._client = self._exit, None, None
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await exit_stack.aclose()

    async def read(self) -> str | None:
        try:
            async with asyncio.timeout(self.timeout * 2):
                client = await self._ssm()
                resp = await client.get_parameter(Name=self.parameter)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "ParameterNotFound":
                return None
            raise DrillAbortedError(
                f"SSM GetParameter {self.parameter}: {_aws_error(exc)}") from None
        except (BotoCoreError, OSError, TimeoutError) as exc:
            await self.close()  # a fresh connection for the next try
            raise DrillAbortedError(
                f"SSM GetParameter {self.parameter}: {_aws_error(exc)}") from None
        return str(resp["Parameter"]["Value"]).strip().lower()

    async def write(self, mode: str) -> None:
        try:
            async with asyncio.timeout(self.timeout * 2):
                client = await self._ssm()
                await client.put_parameter(Name=self.parameter, Value=mode, Type="String",
                                           Overwrite=True)
        except (BotoCoreError, ClientError, OSError, TimeoutError) as exc:
            await self.close()
            raise DrillAbortedError(
                f"SSM PutParameter {self.parameter}: {_aws_error(exc)}") from None


def _aws_error(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}"[:300]
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    return f"{type(exc).__name__}: {exc}"[:300]


class FileModeStore:
    """The mode as a file's first word; written atomically (a listener never reads half)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def describe(self) -> str:
        return f"file:{self.path}"

    async def close(self) -> None:
        return None

    async def read(self) -> str | None:
        try:
            text = await asyncio.to_thread(self.path.read_text, encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise DrillAbortedError(f"cannot read {self.path}: {exc}") from None
        words = text.split()
        return words[0].lower() if words else ""

    async def write(self, mode: str) -> None:
        try:
            await asyncio.to_thread(_write_atomically, self.path, mode + "\n")
        except OSError as exc:
            raise DrillAbortedError(f"cannot write {self.path}: {exc.strerror or exc}") from None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def mode_store(cfg: DrillSinkhole) -> ModeStore:
    if cfg.mode_file is not None:
        return FileModeStore(cfg.mode_file)
    assert cfg.parameter is not None  # the config gives one or the other
    return SsmModeStore(cfg.parameter, region=cfg.region, endpoint_url=cfg.endpoint_url,
                        timeout=cfg.request_timeout)
