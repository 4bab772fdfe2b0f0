"""The ECS task definition and IAM policies: accepted by the AWS APIs (moto), least privilege."""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterator
from pathlib import Path
from string import Template
from typing import Any

import boto3  # type: ignore[import-untyped]  # moto's dependency; no stubs installed
import pytest
from moto import mock_aws

from daemon.config import ENV_OVERRIDES, load_config

ROOT = Path(__file__).resolve().parents[2]
ECS_DIR = ROOT / "deploy" / "ecs"

REGION = "eu-west-1"
ACCOUNT = "123456789012"  # moto's default account, so ARNs it returns line up
# The placeholders a deployer fills in (envsubst, Terraform templatefile, or by hand).
VALUES = {
    "AWS_REGION": REGION,
    "AWS_ACCOUNT_ID": ACCOUNT,
    "SELFCHECKD_IMAGE": f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/selfcheckd:0.1.0",
    "SELFCHECK_FROM": "selfcheck@mail.example.com",
    "SELFCHECK_TO": "selfcheck-receiver@mail.example.com",
    "SELFCHECK_USER": "selfcheck",
    "ALERT_SINK_URL": "https://alerts.mail.example.com/alert",
}
SMTP_OUT_LOG_GROUP = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/ecs/cabal-smtp-out:*"
SINKHOLE_MODE = f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/cabal/sinkhole_mode"
# AWS offers no resource-level permission for these actions, so "*" is required.
RESOURCE_STAR_ALLOWED = {"ecr:GetAuthorizationToken"}
ARN = re.compile(rf"arn:aws:(logs|ssm|kms|ecr):{REGION}:{ACCOUNT}:[a-z-]+[:/]\S+")
HEALTHCHECK_SNIPPET = (
    "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9787/healthz', timeout=4)"
)


def render_text(name: str) -> str:
    """Fill the ${PLACEHOLDERS} of a deploy/ecs file the way envsubst would."""
    text = (ECS_DIR / name).read_text(encoding="utf-8")
    placeholders = set(re.findall(r"\$\{([A-Z_]+)\}", text))
    assert placeholders <= set(VALUES), f"unknown placeholders: {placeholders - set(VALUES)}"
    rendered = Template(text).substitute(VALUES)
    assert "${" not in rendered
    return rendered


def render(name: str) -> Any:
    """A rendered deploy/ecs JSON document, parsed."""
    return json.loads(render_text(name))


def site_config_env_names() -> set[str]:
    """Variables the site config file names through `*_env` keys."""
    return set(re.findall(r'^\w+_env\s*=\s*"(\w+)"', render_text("selfcheckd.toml"), re.M))


def container_environ() -> dict[str, str]:
    """The container's environment as ECS would set it, with stand-in secret values."""
    c = container()
    environ = {e["name"]: e["value"] for e in c["environment"]}
    stand_ins = {"MESSAGES_SELFCHECK_WEBHOOK_URL": "https://pulse.updown.io/token/key"}
    for s in c["secrets"]:
        environ[s["name"]] = stand_ins.get(s["name"], "not-a-real-secret")
    return environ


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """moto's in-process AWS with fake credentials, so nothing can reach a real account."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws():
        yield


def container() -> dict[str, Any]:
    (only,) = render("task-definition.json")["containerDefinitions"]
    assert isinstance(only, dict)
    return only


def statements(name: str) -> list[dict[str, Any]]:
    doc = render(name)
    assert doc["Version"] == "2012-10-17"
    stmts = doc["Statement"]
    assert isinstance(stmts, list)
    return stmts


def as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


def grants(stmts: list[dict[str, Any]], action: str, resource: str) -> bool:
    """True if some Allow statement names `action` on a Resource pattern matching `resource`."""
    return any(
        s["Effect"] == "Allow"
        and action in as_list(s["Action"])
        and any(fnmatch.fnmatchcase(resource, r) for r in as_list(s["Resource"]))
        for s in stmts
    )


def test_roles_and_task_definition_register_with_aws_apis(aws: None) -> None:
    """IAM accepts both policies and the trust policy; ECS accepts the task definition."""
    iam = boto3.client("iam", region_name=REGION)
    ecs = boto3.client("ecs", region_name=REGION)
    trust = json.dumps(render("iam-trust-policy.json"))
    td = render("task-definition.json")
    for role, policy_file in (
        ("selfcheckd-task", "iam-task-role-policy.json"),
        ("selfcheckd-execution", "iam-execution-role-policy.json"),
    ):
        arn = iam.create_role(RoleName=role, AssumeRolePolicyDocument=trust)["Role"]["Arn"]
        assert arn in (td["taskRoleArn"], td["executionRoleArn"])
        # create_policy runs moto's IAM policy grammar checks; a malformed document raises.
        policy = iam.create_policy(
            PolicyName=role, PolicyDocument=json.dumps(render(policy_file))
        )["Policy"]
        iam.attach_role_policy(RoleName=role, PolicyArn=policy["Arn"])

    # botocore validates every key and type against the ECS API model before sending.
    registered = ecs.register_task_definition(**td)["taskDefinition"]
    described = ecs.describe_task_definition(taskDefinition="selfcheckd")["taskDefinition"]
    assert described["taskDefinitionArn"] == registered["taskDefinitionArn"]
    (got,) = described["containerDefinitions"]
    assert got["name"] == "selfcheckd"
    assert got["stopTimeout"] == 30
    assert {s["name"] for s in got["secrets"]} == {s["name"] for s in container()["secrets"]}


def test_environment_loads_as_a_valid_config() -> None:
    """The container's environment plus its secrets is a config selfcheckd accepts."""
    config = load_config(path=None, environ=container_environ()).config
    (route,) = config.selfcheck.routes
    assert route.imap.host == "imap.cabal.internal"
    assert route.imap.port == 143
    assert route.imap.security.value == "starttls"
    assert route.smtp.host.startswith("smtp-out.")
    assert config.server.port == 9787
    assert len(config.heartbeat) == 1


def test_site_image_config_and_environment_load_together(tmp_path: Path) -> None:
    """The site config file plus the task environment is valid and matches the IAM grants."""
    path = tmp_path / "selfcheckd.toml"
    path.write_text(render_text("selfcheckd.toml"), encoding="utf-8")
    config = load_config(path=path, environ=container_environ()).config
    assert len(config.selfcheck.routes) == 1
    leakwatch = config.leakwatch
    assert leakwatch is not None
    task_stmts = statements("iam-task-role-policy.json")
    for group in leakwatch.cloudwatch.log_groups:
        arn = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{group}:*"
        assert grants(task_stmts, "logs:FilterLogEvents", arn), group
    parameter = f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter{leakwatch.sinkhole_mode.parameter}"
    assert grants(task_stmts, "ssm:GetParameter", parameter)
    # The checkpoint must sit on a writable volume: the root fs is read-only.
    state = leakwatch.state_path
    assert state is not None
    mounts = {m["containerPath"] for m in container()["mountPoints"]}
    assert any(state.is_relative_to(m) for m in mounts), state
    assert leakwatch.alert is not None
    assert leakwatch.alert.secret is not None  # resolved from CABAL_ALERT_SINK_SECRET


def test_site_dockerfile_points_selfcheckd_at_the_copied_config() -> None:
    """Dockerfile.site copies selfcheckd.toml to the path SELFCHECKD_CONFIG names."""
    text = (ECS_DIR / "Dockerfile.site").read_text(encoding="utf-8")
    copy = re.search(r"^COPY selfcheckd\.toml (\S+)$", text, re.M)
    env = re.search(r"^ENV SELFCHECKD_CONFIG=(\S+)$", text, re.M)
    assert copy
    assert env
    assert copy.group(1) == env.group(1)


def test_every_selfcheckd_variable_is_one_the_daemon_reads() -> None:
    """A misspelt variable would be silently ignored: each is an override or a config `*_env`."""
    c = container()
    names = [e["name"] for e in c["environment"]] + [s["name"] for s in c["secrets"]]
    assert len(names) == len(set(names)), "a variable is set twice"
    for name in names:
        if name.startswith("AWS_"):
            continue
        known = name in ENV_OVERRIDES or name in site_config_env_names()
        assert known or name == "SELFCHECKD_CONFIG", name


def test_secrets_come_from_ssm_never_plain_environment() -> None:
    """Passwords, the probe secret and the pulse URL are SSM secrets, not plain values."""
    c = container()
    plain = {e["name"] for e in c["environment"]}
    secret_names = {s["name"] for s in c["secrets"]}
    required = {
        "MESSAGES_SELFCHECK_SECRET", "MESSAGES_SELFCHECK_WEBHOOK_URL",
        "SELFCHECK_SMTP_PASSWORD", "SELFCHECK_IMAP_PASSWORD",
    }
    assert required <= secret_names
    assert not plain & secret_names
    assert not any(re.search(r"PASSWORD|SECRET|WEBHOOK", n) for n in plain)
    for s in c["secrets"]:
        assert s["valueFrom"].startswith(f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/cabal/")


def test_container_shutdown_and_health_settings() -> None:
    """stopTimeout outlasts shutdown_grace; the health check calls /healthz like the image."""
    c = container()
    grace = float({e["name"]: e["value"] for e in c["environment"]}["SELFCHECKD_SHUTDOWN_GRACE"])
    assert c["stopTimeout"] >= grace + 5
    assert c["healthCheck"]["command"] == ["CMD", "python", "-c", HEALTHCHECK_SNIPPET]
    # The Dockerfile's HEALTHCHECK must be the same command, so both agree.
    assert HEALTHCHECK_SNIPPET in (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert c["healthCheck"]["timeout"] < c["healthCheck"]["interval"]
    assert c["portMappings"] == [{"name": "metrics", "containerPort": 9787, "protocol": "tcp"}]


def test_container_is_locked_down() -> None:
    """Non-root, read-only root fs, no capabilities; state and /tmp are writable volumes."""
    td = render("task-definition.json")
    c = container()
    assert c["user"] == "10001:10001"
    assert c["readonlyRootFilesystem"] is True
    assert c["linuxParameters"]["capabilities"]["drop"] == ["ALL"]
    volumes = {v["name"] for v in td["volumes"]}
    mounts = {m["containerPath"]: m["sourceVolume"] for m in c["mountPoints"]}
    assert set(mounts) == {"/var/lib/selfcheckd", "/tmp"}
    assert set(mounts.values()) <= volumes


def test_logs_go_to_their_own_group_without_blocking() -> None:
    """awslogs ships to /ecs/selfcheckd; non-blocking so a CloudWatch stall can't stall checks."""
    log = container()["logConfiguration"]
    assert log["logDriver"] == "awslogs"
    assert log["options"]["awslogs-group"] == "/ecs/selfcheckd"
    assert log["options"]["awslogs-region"] == REGION
    assert log["options"]["mode"] == "non-blocking"


@pytest.mark.parametrize(
    "policy", ["iam-task-role-policy.json", "iam-execution-role-policy.json"]
)
def test_policies_are_least_privilege(policy: str) -> None:
    """No wildcard actions, no Deny/Not* tricks, Resource "*" only where AWS requires it."""
    for s in statements(policy):
        assert s["Effect"] == "Allow"
        assert not {"NotAction", "NotResource", "NotPrincipal"} & set(s)
        actions = as_list(s["Action"])
        for action in actions:
            assert "*" not in action, f"{s['Sid']}: wildcard action {action}"
        for resource in as_list(s["Resource"]):
            # moto checks grammar, not ARN shape; a truncated ARN would match nothing.
            assert resource == "*" or ARN.fullmatch(resource), f"{s['Sid']}: bad ARN {resource}"
        if "*" in as_list(s["Resource"]):
            assert set(actions) <= RESOURCE_STAR_ALLOWED, f"{s['Sid']}: Resource * for {actions}"
        if any(a.startswith("kms:") for a in actions):
            condition = s["Condition"]
            assert condition["StringEquals"]["kms:ViaService"] == f"ssm.{REGION}.amazonaws.com"
            assert condition["StringLike"]["kms:EncryptionContext:PARAMETER_ARN"]


def test_task_role_reads_only_the_smtp_out_log_group_and_sinkhole_mode() -> None:
    """The running daemon may read smtp-out's log group and /cabal/sinkhole_mode, nothing else."""
    stmts = statements("iam-task-role-policy.json")
    by_action = {a: as_list(s["Resource"]) for s in stmts for a in as_list(s["Action"])}
    assert by_action == {
        "logs:FilterLogEvents": [SMTP_OUT_LOG_GROUP],
        "ssm:GetParameter": [SINKHOLE_MODE],
        "kms:Decrypt": [f"arn:aws:kms:{REGION}:{ACCOUNT}:key/*"],
    }
    (kms,) = [s for s in stmts if s["Action"] == "kms:Decrypt"]
    assert kms["Condition"]["StringLike"]["kms:EncryptionContext:PARAMETER_ARN"] == [SINKHOLE_MODE]
    assert not grants(stmts, "logs:FilterLogEvents",
                      f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/ecs/cabal-imap:*")


def test_execution_role_covers_exactly_the_task_definitions_secrets() -> None:
    """ECS can fetch and decrypt each SSM secret of the task, and no other parameter."""
    stmts = statements("iam-execution-role-policy.json")
    wanted = [s["valueFrom"] for s in container()["secrets"]]
    (ssm,) = [s for s in stmts if "ssm:GetParameters" in as_list(s["Action"])]
    assert sorted(as_list(ssm["Resource"])) == sorted(wanted)
    (kms,) = [s for s in stmts if s["Action"] == "kms:Decrypt"]
    contexts = kms["Condition"]["StringLike"]["kms:EncryptionContext:PARAMETER_ARN"]
    assert sorted(contexts) == sorted(wanted)
    assert not grants(stmts, "ssm:GetParameters", SINKHOLE_MODE)
    own_group = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/ecs/selfcheckd:log-stream:x"
    assert grants(stmts, "logs:PutLogEvents", own_group)
    image_repo = VALUES["SELFCHECKD_IMAGE"].split("/", 1)[1].split(":")[0]
    assert grants(stmts, "ecr:BatchGetImage",
                  f"arn:aws:ecr:{REGION}:{ACCOUNT}:repository/{image_repo}")


def test_trust_policy_admits_only_this_accounts_ecs_tasks() -> None:
    """Only ecs-tasks.amazonaws.com, on behalf of this account, can assume the roles."""
    (s,) = statements("iam-trust-policy.json")
    assert s["Principal"] == {"Service": "ecs-tasks.amazonaws.com"}
    assert s["Action"] == "sts:AssumeRole"
    assert s["Condition"]["StringEquals"]["aws:SourceAccount"] == ACCOUNT
