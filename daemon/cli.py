"""`selfcheckd run | check | dns | scan | config-check | init | demo | drill | sinkhole`.

Exit codes: 0 success, 1 a check failed or a leak was found, 2 bad configuration
or input, 3 the daemon could not start (e.g. its port is in use), or, for `scan`, the
log is blind (no delivery line: nothing could be judged) or --queue-id found nothing,
or, for `dns`, some item could not be decided.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path

from daemon import __version__
from daemon.config import Config, ConfigError, LoadedConfig, load_config
from daemon.logs import configure_logging, redact_secrets

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_STARTUP = 0, 1, 2, 3


def _load(args: argparse.Namespace) -> LoadedConfig | None:
    try:
        loaded = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"selfcheckd: config: {problem}", file=sys.stderr)
        return None
    redact_secrets(loaded.config.secret_values())
    return loaded


def _cmd_config_check(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return EXIT_CONFIG
    cfg = loaded.config
    source = str(loaded.path) if loaded.path else "environment"
    print(f"config OK ({source}): {len(cfg.selfcheck.routes)} route(s), "
          f"{len(cfg.heartbeat)} heartbeat target(s), "
          f"leak watcher {'on' if cfg.leakwatch else 'off'}, {len(cfg.dns)} dns entr"
          f"{'y' if len(cfg.dns) == 1 else 'ies'}")
    for key, value in placeholders(cfg):
        print(f"warning: {key} = {value} is an example domain (RFC 2606), "
              "a placeholder to replace")
    for warning in [*drill_warnings(cfg), *ha_warnings(cfg)]:
        print(f"warning: {warning}")
    if not args.connect:
        return EXIT_OK
    from daemon.connect_check import check_connections

    configure_logging(cfg.logging.format, "warning", timestamps=cfg.logging.timestamps)
    ok = asyncio.run(check_connections(cfg, sys.stdout))
    return EXIT_OK if ok else EXIT_FAILED


def placeholders(cfg: Config) -> list[tuple[str, str]]:
    """(key, value) of the hosts and addresses still in an RFC 2606 example domain, as
    `init` and config.example.toml leave them: valid, but no mail goes there."""
    found = []
    for i, route in enumerate(cfg.selfcheck.routes):
        where = f"selfcheck.routes[{i}]"
        for key, value in ((f"{where}.from", route.from_), (f"{where}.to", route.to),
                           (f"{where}.smtp.host", route.smtp.host),
                           (f"{where}.imap.host", route.imap.host)):
            if _example_domain(value.rpartition("@")[2]):
                found.append((key, value))
    return found


def ha_warnings(cfg: Config) -> list[str]:
    """What config-check says about [ha] beyond its validation: where the state lives."""
    leak = cfg.leakwatch
    if cfg.ha is None or leak is None:
        return []
    if leak.state_s3 is not None:
        return []
    if leak.state_path is None:
        return ["ha without leakwatch.state_file: each takeover starts the leak watcher "
                "afresh (CloudWatch from lookback): leaks in that window are alerted again and "
                "alerts pending in the old leader are lost"]
    return [f"ha with leakwatch.state_file = {leak.state_path}: every task must reach this "
            "one file (EFS), and a deposed leader's late write is not refused there; "
            "an s3://bucket/key state refuses it (docs/ha.md)"]


def drill_warnings(cfg: Config) -> list[str]:
    """What config-check says about [drill] beyond its validation."""
    drill = cfg.drill
    if drill is None:
        return []
    out = []
    if drill.refused:
        out.append(f"drill.environment = {drill.environment}: `selfcheckd drill` refuses to "
                   "run there (it stops a task and flips the sinkhole)")
    if cfg.leakwatch is None:
        from daemon.config import sender_allowed
        from daemon.logwatch.config import LeakWatchConfig

        default = LeakWatchConfig().allowed_senders
        if not sender_allowed(drill.sender, list(default)):
            out.append(f"drill.sender = {drill.sender} does not match the leak watcher's "
                       f"default allowed_senders ({', '.join(default)}): a leak watcher "
                       "elsewhere would alert on the drill's message")
    if drill.driver == "ecs" and drill.schedule is not None and drill.journal_dir is None:
        out.append("drill.schedule without drill.journal_dir: a restart forgets when the "
                   "last drill ran and passed")
    return out


def _example_domain(domain: str) -> bool:
    domain = domain.lower().rstrip(".")
    return any(domain == d or domain.endswith("." + d)
               for d in ("example.com", "example.net", "example.org", "example"))


def _cmd_check(args: argparse.Namespace) -> int:
    from daemon.check_command import check_routes

    loaded = _load(args)
    if loaded is None:
        return EXIT_CONFIG
    cfg = loaded.config
    if not cfg.selfcheck.routes:
        print("selfcheckd: config: selfcheck.routes: no route to check", file=sys.stderr)
        return EXIT_CONFIG
    names = [r.name for r in cfg.selfcheck.routes]
    unknown = [n for n in args.route or [] if n not in names]
    if unknown:
        print(f"selfcheckd check: --route: no such route: {', '.join(map(_shown, unknown))} "
              f"(routes: {', '.join(names)})", file=sys.stderr)
        return EXIT_CONFIG
    if args.heartbeat and not cfg.heartbeat:
        print("selfcheckd check: --heartbeat: no [[heartbeat]] target is configured "
              "(nor MESSAGES_SELFCHECK_WEBHOOK_URL)", file=sys.stderr)
        return EXIT_CONFIG
    if not args.heartbeat_timeout > 0:  # also NaN
        print("selfcheckd check: --heartbeat-timeout: must be greater than 0",
              file=sys.stderr)
        return EXIT_CONFIG
    routes = [r for r in cfg.selfcheck.routes if not args.route or r.name in args.route]
    configure_logging(cfg.logging.format, "debug" if args.verbose else cfg.logging.level,
                      timestamps=cfg.logging.timestamps)

    outcome = asyncio.run(check_routes(cfg, routes, heartbeat=args.heartbeat,
                                       heartbeat_timeout=args.heartbeat_timeout))
    for result in outcome.results:
        data = result.as_dict(verbose=args.verbose)
        print(json.dumps(data) if args.json else json.dumps(data, indent=2))
    for line in outcome.heartbeats:
        print(line, file=sys.stderr)
    if cfg.pushgateway is not None:
        from daemon.pushgateway import push_results

        # One group per route whenever the config has several, even with --route,
        # so a partial check never lands in (and lingers as) the ungrouped group.
        push_results(cfg.pushgateway, outcome.results,
                     grouped=len(cfg.selfcheck.routes) > 1)
    return EXIT_OK if all(r.success for r in outcome.results) else EXIT_FAILED


def _cmd_dns(args: argparse.Namespace) -> int:
    loaded = _load(args)
    if loaded is None:
        return EXIT_CONFIG
    from daemon.dns.command import run_command

    # The verdicts go to stdout; only what goes wrong in selfcheckd itself is logged.
    configure_logging(loaded.config.logging.format, "error")
    return run_command(loaded.config.dns, args.name, as_json=args.json)


def _cmd_run(args: argparse.Namespace) -> int:
    # SIGHUP means "reload" once the daemon runs; until its handler is in place (and
    # after it is gone at the exit) it must not kill the process, as its default does.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from daemon.app import serve

    loaded = _load(args)
    if loaded is None:
        return EXIT_CONFIG
    log_cfg = loaded.config.logging
    configure_logging(log_cfg.format, log_cfg.level, timestamps=log_cfg.timestamps)
    return serve(loaded, config_path=args.config)


def _cmd_scan(args: argparse.Namespace) -> int:
    from daemon.logwatch.config import LeakWatchConfig
    from daemon.logwatch.scan_command import run as run_scan

    leakwatch: LeakWatchConfig | None = None
    if args.config is not None or _env_config():
        loaded = _load(args)
        if loaded is None:
            return EXIT_CONFIG
        leakwatch = loaded.config.leakwatch
        log_cfg = loaded.config.logging
        configure_logging(log_cfg.format, log_cfg.level, timestamps=log_cfg.timestamps)
    else:
        configure_logging()
    return run_scan(args, leakwatch if leakwatch is not None else LeakWatchConfig())


def _env_config() -> bool:
    import os

    return bool(os.environ.get("SELFCHECKD_CONFIG"))


def _cmd_init(args: argparse.Namespace) -> int:
    from daemon.starter import write_starter

    return write_starter(args.output, force=args.force)


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.drill:
        from daemon.drill.lab import run_demo as run_drill_demo

        configure_logging("kv", "warning")
        return run_drill_demo(args.workdir)
    from daemon.demo import run_demo

    return run_demo(args)


def _cmd_drill(args: argparse.Namespace) -> int:
    from daemon.drill.command import run as run_drill

    loaded = _load(args)
    if loaded is None:
        return EXIT_CONFIG
    configure_logging(loaded.config.logging.format, "warning")
    return run_drill(loaded.config, args)


def _cmd_sinkhole(args: argparse.Namespace) -> int:
    from daemon.sinkhole import run_command

    configure_logging("kv", "info")
    return run_command(args)


def _shown(name: str) -> str:
    """A route name as typed, quoted when it would not read as one (empty, spaces)."""
    return name if name and name.isprintable() and not any(c.isspace() for c in name) \
        else repr(name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfcheckd",
        description="End-to-end mail pipeline selfchecks and a sinkhole leak watcher.",
    )
    parser.add_argument("--version", action="version", version=f"selfcheckd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", type=Path, default=None,
                       help="TOML config file (default: $SELFCHECKD_CONFIG, else env only)")
        return p

    def command(name: str, summary: str, description: str,
                epilog: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=summary, description=description, epilog=epilog,
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = with_config(command(
        "run", "run the daemon: scheduled checks, leak watcher, /metrics",
        "Run selfcheckd as a service: a round trip per route every interval, the leak\n"
        "watcher, the [[dns]] checks, heartbeats, and /metrics /healthz /readyz /status\n"
        "(and /probe with [server] probe = true). SIGTERM stops it within shutdown_grace (+2 s);\n"
        "SIGHUP reloads the config, all of it or none.",
        "exit codes: 0 stopped by a signal, 1 a second signal forced the exit,\n"
        "            2 bad configuration, 3 could not start (port in use)\n"
        "example:    selfcheckd run --config /etc/selfcheckd.toml"))
    p.set_defaults(func=_cmd_run)

    p = with_config(command(
        "check", "one round trip of every route (or of --route), then exit",
        "Send a probe by SMTP on each route, wait for it over IMAP, verify and delete it,\n"
        "print the result JSON per route on stdout; with [pushgateway], push it (cron\n"
        "jobs). With --heartbeat, ping the [[heartbeat]] targets as `run` does: a target\n"
        "pulses success only if every route it covers succeeded in this invocation, a\n"
        "failed covered route sends its failure, and a covered route not checked here\n"
        "(--route) withholds the success. One line per target goes to stderr\n"
        "(`heartbeat NAME: success 1`, or why nothing was sent).",
        "exit codes: 0 every checked route succeeded, 1 a route failed,\n"
        "            2 bad configuration, unknown --route, or --heartbeat without a\n"
        "            [[heartbeat]] target; a failed ping or push changes none of these\n"
        "example:    selfcheckd check --config selfcheckd.toml --route default --verbose\n"
        "            selfcheckd check --config selfcheckd.toml --json --heartbeat"))
    p.add_argument("--verbose", action="store_true", help="log each step with its timing")
    p.add_argument("--json", action="store_true", help="one compact JSON object per route")
    p.add_argument("--route", action="append", metavar="NAME",
                   help="check only this route (repeatable; default: every route)")
    p.add_argument("--heartbeat", action="store_true",
                   help="ping the [[heartbeat]] targets with the results (as `run` does)")
    p.add_argument("--heartbeat-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="after the last round trip, the pings get this long in all, "
                        "retries included; undelivered ones then count as failures "
                        "(default: 30)")
    p.set_defaults(func=_cmd_check)

    p = with_config(command(
        "dns", "check the [[dns]] entries once: blocklists, PTR, MX, SPF, DKIM, DMARC, MTA-STS",
        "For every [[dns]] entry (or --name): each sending IP on each blocklist and its\n"
        "forward-confirmed PTR; the domain's MX, SPF (evaluated for each sending IP),\n"
        "DKIM keys, DMARC, MTA-STS and TLS-RPT. One line per item: entry, item, verdict\n"
        "(ok, problem, or error when it could not be decided), reason (docs/dns.md).",
        "exit codes: 0 every item ok, 1 an item is a problem, 2 bad configuration or\n"
        "            unknown --name, 3 an item could not be decided and none is a problem\n"
        "example:    selfcheckd dns --config selfcheckd.toml --name example.com --json"))
    p.add_argument("--json", action="store_true", help="one JSON object per item")
    p.add_argument("--name", action="append", metavar="NAME",
                   help="check only this entry (repeatable; default: every entry)")
    p.set_defaults(func=_cmd_dns)

    p = with_config(command(
        "config-check", "validate the configuration (and with --connect, reach its servers)",
        "Load and validate the configuration and report every problem at once. With\n"
        "--connect, also reach each configured server (SMTP and IMAP login, the log\n"
        "source, webhook hosts) without sending mail or pinging anything.",
        "exit codes: 0 valid (and every server reached), 1 a server could not be\n"
        "            reached (--connect), 2 invalid configuration\n"
        "example:    selfcheckd config-check --config selfcheckd.toml --connect"))
    p.add_argument("--connect", action="store_true",
                   help="also reach every configured server (no mail sent, nothing pinged)")
    p.set_defaults(func=_cmd_config_check)

    p = command(
        "init", "write a minimal working starter config",
        "Write a starter configuration with one route; every value to replace is\n"
        "marked. Then check it with `selfcheckd config-check --connect`.",
        "exit codes: 0 written, 2 the file exists (use --force) or cannot be written\n"
        "example:    selfcheckd init --output selfcheckd.toml")
    p.add_argument("--output", type=Path, default=Path("selfcheckd.toml"),
                   help="where to write it (default: selfcheckd.toml)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_cmd_init)

    p = with_config(command(
        "scan", "one-shot scan of a mail log: sinkhole leaks, or the queue (--queue)",
        "Read a mail log (a file, standard input, or the CloudWatch log groups of\n"
        "[leakwatch.cloudwatch] over --since) and print every leaked sinkhole\n"
        "recipient on stdout; a summary goes to stderr. With --queue, list every\n"
        "message still deferred at the end of the input instead; with --queue-id ID,\n"
        "print the whole history of one message (docs/queue-health.md).",
        "exit codes: 0 no leak (--queue: nothing deferred; --queue-id: not deferred),\n"
        "            1 leaks found (messages deferred; the message is deferred),\n"
        "            2 bad input (unreadable file, not a mail log, bad --since,\n"
        "            CloudWatch unreachable) or configuration, 3 the log is blind:\n"
        "            mail log lines but no delivery (to=) line, so nothing could be\n"
        "            judged (sendmail LogLevel below 8); --queue-id: no such id\n"
        "example:    selfcheckd scan --file /var/log/maillog --json\n"
        "            selfcheckd scan --cloudwatch --since 6h --queue-id 6ANJUQna010773"))
    try:
        from daemon.logwatch.scan_command import add_arguments as add_scan_arguments
    except ImportError:  # the leak watcher is optional at import time
        pass
    else:
        add_scan_arguments(p)
    p.set_defaults(func=_cmd_scan)

    p = command(
        "demo", "run against an embedded mail stack (no setup needed)",
        "Start an SMTP server delivering into an IMAP server, a local heartbeat and\n"
        "alert receiver, and selfcheckd against them, all on 127.0.0.1; a leak is\n"
        "appended to the demo's maillog after 5 s.",
        "exit codes: 0 stopped (Ctrl-C or --duration), 2 bad arguments, 3 could not\n"
        "            listen, or another demo runs in --workdir (its files are left alone)\n"
        "example:    selfcheckd demo --duration 30")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between selfchecks")
    p.add_argument("--listen", default="127.0.0.1:9787", help="HOST:PORT for /metrics")
    p.add_argument("--workdir", type=Path, default=Path(".demo"),
                   help="where the demo's maillog and state live")
    p.add_argument("--duration", type=float, default=0.0,
                   help="stop after this many seconds (0: until Ctrl-C)")
    p.add_argument("--no-inject-leak", dest="inject_leak", action="store_false",
                   help="do not append a leaked-recipient line 5 s after start")
    p.add_argument("--drill", action="store_true",
                   help="instead: the queue-persistence drill against two real sendmail "
                        "daemons over one queue directory (needs sendmail and root)")
    p.add_argument("--print-leak-line", action="store_true",
                   help="print a leaked-recipient maillog line (to append to the demo log)")
    p.set_defaults(func=_cmd_demo)

    p = with_config(command(
        "drill", "run the queue-persistence drill (the runbook's 8 steps and its cleanup)",
        "queue-persistence: park the sinkhole in defer, send one message to it, check\n"
        "that every smtp-out task lists it deferred, replace one task, check again (the\n"
        "replacement included), flip the sinkhole to accept, run the queue, check it\n"
        "drained; whatever happens, park the sinkhole in defer again. One line per step\n"
        "on stderr; the journal with --json / --journal (docs/drill.md).",
        "exit codes: 0 passed, 1 the queue did not behave, 2 usage, config or refused\n"
        "            (prod, no harness, another drill running), 3 aborted by the\n"
        "            environment or a signal (cleanup done), 4 the cleanup failed: the\n"
        "            sinkhole may be left in accept\n"
        "example:    selfcheckd drill queue-persistence --config stage.toml --journal j.json"))
    p.add_argument("drill_name", choices=["queue-persistence"], metavar="queue-persistence",
                   help="the drill to run")
    p.add_argument("--json", action="store_true", help="print the journal on stdout")
    p.add_argument("--journal", type=Path, metavar="PATH", help="also write the journal here")
    p.add_argument("--keep-going", action="store_true",
                   help="after a failed check in step 3 or 5, run the remaining steps too")
    p.set_defaults(func=_cmd_drill)

    p = command(
        "sinkhole", "the sinkhole test harness's SMTP listener (modes from SSM or a file)",
        "An SMTP listener that answers every recipient per a mode, re-read on each new\n"
        "connection (cached --mode-cache s): defer (421 4.3.2), bounce (550 5.1.1),\n"
        "accept, accept-log (envelope and headers as one JSON line on stdout, never\n"
        "the body), greylist (421 on an IP's first try, 250 for 30 min). An unknown or\n"
        "unreadable mode is defer. Logs go to stderr (docs/drill.md).",
        "exit codes: 0 stopped (SIGTERM, Ctrl-C), 2 bad arguments, 3 could not listen\n"
        "example:    selfcheckd sinkhole --listen 127.0.0.2:25 --mode-file /run/sinkhole_mode\n"
        "            selfcheckd sinkhole --listen 0.0.0.0:25 --mode-parameter /cabal/sinkhole_mode")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="where to listen")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--mode-parameter", metavar="NAME",
                        help="SSM parameter holding the mode (e.g. /cabal/sinkhole_mode)")
    source.add_argument("--mode-file", type=Path, metavar="PATH",
                        help="file whose first word is the mode")
    p.add_argument("--endpoint-url", metavar="URL", help="SSM endpoint (tests, VPC endpoints)")
    p.add_argument("--region", metavar="REGION", help="SSM region (default: the SDK's)")
    p.add_argument("--mode-cache", type=_positive_float, default=30.0, metavar="SECONDS",
                   help="how long a mode reading is reused (default: 30)")
    p.add_argument("--max-message-size", type=int, default=10 * 1024 * 1024, metavar="BYTES",
                   help="larger messages are refused with 552 (default: 10 MiB)")
    p.set_defaults(func=_cmd_sinkhole)
    return parser


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not number > 0 or number != number or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {value!r}")
    return number


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Said by the command's own parser, so its usage line is the one shown (argparse
        # has no public way to reach a subparser).
        commands = next(a for a in parser._actions
                        if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        code = 130
    return code


if __name__ == "__main__":
    sys.exit(main())
