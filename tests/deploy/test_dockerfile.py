"""The Dockerfile and .dockerignore, checked by parsing (no Docker engine runs in CI)."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import tomllib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

# Packages that must never reach the runtime image: compilers and fetch tools.
FORBIDDEN_IN_RUNTIME = re.compile(
    r"\b(gcc|g\+\+|cc|clang|build-essential|make|python3?-dev|libc6?-dev|curl|wget)\b"
)


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def _logical_lines(text: str) -> list[str]:
    """Join backslash continuations and drop comments, as BuildKit does."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue  # comments may sit inside a continued instruction too
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    if current.strip():
        lines.append(current.strip())
    return lines


def _expand(value: str, args: dict[str, str]) -> str:
    return re.sub(
        r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: args.get(m.group(1), m.group(0)), value
    )


def parse_dockerfile(text: str) -> list[Stage]:
    """Split a Dockerfile into stages; global ARG defaults are expanded in FROM."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in _logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        args = args.strip()
        if keyword == "FROM":
            words = [w for w in args.split() if not w.startswith("--")]
            image = _expand(words[0], global_args)
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(image=image, name=name))
        elif not stages:
            if keyword == "ARG":
                key, _, default = args.partition("=")
                global_args[key] = default.strip('"')
        else:
            stages[-1].instructions.append(Instruction(keyword, args))
    return stages


def exec_form(args: str) -> list[str]:
    """Parse an exec-form (JSON array) argument, failing the test if it is shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"not exec form (a JSON array): {args}")
    assert isinstance(value, list)
    assert all(isinstance(v, str) for v in value)
    return value


def healthcheck_command(stage: Stage) -> list[str]:
    (check,) = stage.all("HEALTHCHECK")
    options, sep, command = check.args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {check.args}"
    assert "--interval" in options
    assert "--timeout" in options
    return exec_form(command)


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """Translate one .dockerignore pattern (Go filepath.Match plus `**`) to a regex."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    # A matched directory excludes everything below it.
    return re.compile(out + "(?:/.*)?")


def is_ignored(path: str, ignore_text: str) -> bool:
    """Docker's rule: the last matching pattern wins; `!pattern` re-includes."""
    ignored = False
    for raw in ignore_text.splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if _ignore_regex(pattern).fullmatch(path):
            ignored = not negate
    return ignored


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    return stages[-1]


def test_build_is_multi_stage_with_a_named_builder(stages: list[Stage]) -> None:
    """A builder stage makes the wheel and venv; a separate final stage runs it."""
    assert len(stages) >= 2
    assert stages[0].name == "builder"
    builder_runs = " ".join(i.args for i in stages[0].all("RUN"))
    assert "pip wheel" in builder_runs
    assert "venv" in builder_runs


def test_final_stage_is_python_slim(runtime: Stage) -> None:
    """The runtime base is an official python 3.11+ slim image."""
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-[a-z]+)?", runtime.image), runtime.image


def test_runtime_takes_only_the_venv_from_the_builder(runtime: Stage) -> None:
    """The final stage copies the finished venv and installs nothing itself."""
    copies = runtime.all("COPY")
    assert copies, "runtime stage copies nothing"
    for copy in copies:
        assert "--from=builder" in copy.args
        assert copy.args.split()[-2:] == ["/opt/venv", "/opt/venv"]
    for run in runtime.all("RUN"):
        assert "pip install" not in run.args
        assert "apt-get install" not in run.args


def test_runtime_has_no_compiler_or_fetch_tool(runtime: Stage) -> None:
    """No gcc, build-essential, curl or wget is installed in the final image."""
    for run in runtime.all("RUN"):
        assert not FORBIDDEN_IN_RUNTIME.search(run.args), run.args


def test_runs_as_non_root_before_entrypoint(runtime: Stage) -> None:
    """USER names a non-root uid and comes before ENTRYPOINT in the final stage."""
    keywords = [i.keyword for i in runtime.instructions]
    users = runtime.all("USER")
    assert users, "final stage never sets USER"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0")
    assert max(i for i, k in enumerate(keywords) if k == "USER") < keywords.index("ENTRYPOINT")


def test_entrypoint_and_cmd_are_exec_form(runtime: Stage) -> None:
    """ENTRYPOINT and CMD are JSON arrays, so selfcheckd is PID 1 and receives SIGTERM."""
    (entrypoint,) = runtime.all("ENTRYPOINT")
    (cmd,) = runtime.all("CMD")
    assert exec_form(entrypoint.args) == ["selfcheckd"]
    assert exec_form(cmd.args) == ["run"]


def test_entrypoint_is_the_projects_console_script() -> None:
    """The ENTRYPOINT name is the console script pyproject.toml installs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "selfcheckd" in project["project"]["scripts"]


def test_exposes_the_metrics_port(runtime: Stage) -> None:
    """Port 9787 (/metrics, /healthz, /readyz, /status) is declared."""
    exposed = {p.split("/")[0] for e in runtime.all("EXPOSE") for p in e.args.split()}
    assert "9787" in exposed


def test_healthcheck_calls_healthz_with_urllib(runtime: Stage) -> None:
    """The HEALTHCHECK is exec form, uses python's urllib and targets /healthz."""
    command = healthcheck_command(runtime)
    assert command[:2] == ["python", "-c"]
    assert "urllib.request" in command[2]
    assert "http://127.0.0.1:9787/healthz" in command[2]
    assert "timeout=" in command[2]


def test_state_dir_is_a_volume_owned_by_the_runtime_user(runtime: Stage) -> None:
    """The leak watcher's state dir is created for the runtime user and declared a VOLUME."""
    runs = " ".join(i.args for i in runtime.all("RUN"))
    assert "-o selfcheckd" in runs
    assert "/var/lib/selfcheckd" in runs
    volumes = [v for i in runtime.all("VOLUME") for v in exec_form(i.args)]
    assert "/var/lib/selfcheckd" in volumes


@pytest.mark.parametrize(
    "path", [".venv", ".venv/bin/python", ".git", ".git/HEAD", ".pytest_cache",
             "daemon/__pycache__/config.cpython-312.pyc", "tests/deploy/test_ecs.py", ".env"],
)
def test_dockerignore_excludes_local_state(path: str) -> None:
    """Local environments, VCS data, caches and tests stay out of the build context."""
    assert is_ignored(path, DOCKERIGNORE.read_text(encoding="utf-8"))


def test_dockerignore_keeps_every_copied_path(stages: list[Stage]) -> None:
    """Every path a COPY takes from the build context survives .dockerignore."""
    ignore_text = DOCKERIGNORE.read_text(encoding="utf-8")
    sources = [
        src
        for stage in stages
        for copy in stage.all("COPY")
        if "--from=" not in copy.args
        for src in copy.args.split()[:-1]
    ]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"COPY source missing from the repo: {src}"
        assert not is_ignored(src.rstrip("/").removeprefix("./"), ignore_text), src
    assert not is_ignored("daemon/config.py", ignore_text)


@pytest.fixture
async def healthz_server() -> AsyncIterator[tuple[str, dict[str, int]]]:
    """A real HTTP server whose /healthz status the test sets."""
    state = {"status": 200}

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(status=state["status"], text="ok\n")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"127.0.0.1:{port}", state
    finally:
        await runner.cleanup()


async def run_check(command: list[str], address: str) -> int:
    """Run a healthcheck command (python -c ...) pointed at `address`; return its exit code."""
    assert command[0] == "python"
    code = command[2].replace("127.0.0.1:9787", address)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    async with asyncio.timeout(30):
        return await proc.wait()


async def test_healthcheck_command_exit_code_follows_healthz(
    runtime: Stage, healthz_server: tuple[str, dict[str, int]]
) -> None:
    """The HEALTHCHECK exits 0 on 200 and non-zero on 503 or when nothing listens."""
    command = healthcheck_command(runtime)
    address, state = healthz_server
    assert await run_check(command, address) == 0
    state["status"] = 503
    assert await run_check(command, address) != 0
    # A closed port: bind, learn the number, close, then probe it.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    closed = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    assert await run_check(command, f"127.0.0.1:{closed}") != 0
