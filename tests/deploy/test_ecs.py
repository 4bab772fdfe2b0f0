"""The ECS deployment: task definition and IAM policies accepted by the AWS APIs (moto) and
least privilege, two tasks with the lease in DynamoDB and the state in S3, stopTimeout against
the shutdown budget, the Terraform sketch."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from string import Template
from typing import Any

import boto3  # type: ignore[import-untyped]  # moto's dependency; no stubs installed
import pytest
from moto import mock_aws

from daemon.config import ENV_OVERRIDES, Config, load_config

ROOT = Path(__file__).resolve().parents[2]
ECS_DIR = ROOT / "deploy" / "ecs"
TERRAFORM_DIR = ROOT / "deploy" / "terraform"
DOCS = ROOT / "docs" / "deploy-ecs.md"
# A local mirror of the hashicorp/aws provider; `terraform test` runs offline against it.
TF_PLUGIN_DIR = Path(os.environ.get("SELFCHECKD_TF_PLUGIN_DIR", "/opt/tf-plugins"))

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
    "STATE_BUCKET": "selfcheckd-state-123456789012",
    "LEASE_TABLE": "selfcheckd-lease",
}
SMTP_OUT_LOG_GROUP = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/ecs/cabal-smtp-out:*"
SINKHOLE_MODE = f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/cabal/sinkhole_mode"
LEASE_TABLE = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{VALUES['LEASE_TABLE']}"
STATE_BUCKET = f"arn:aws:s3:::{VALUES['STATE_BUCKET']}"
STATE_OBJECT = f"{STATE_BUCKET}/leakwatch-state.json"
# What ECS allows at most for a Fargate container's stopTimeout.
FARGATE_MAX_STOP_TIMEOUT = 120
# The daemon's promise: every shutdown path ends within shutdown_grace + this.
SHUTDOWN_OVERRUN = 5
# AWS offers no resource-level permission for these actions, so "*" is required.
RESOURCE_STAR_ALLOWED = {"ecr:GetAuthorizationToken"}
ARN = re.compile(
    rf"arn:aws:(logs|ssm|kms|ecr|dynamodb):{REGION}:{ACCOUNT}:[a-z-]+[:/]\S+"
    r"|arn:aws:s3:::[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/\S+)?")
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


def site_config(tmp_path: Path) -> Config:
    """The configuration the container runs with: the site config file plus its environment."""
    path = tmp_path / "selfcheckd.toml"
    path.write_text(render_text("selfcheckd.toml"), encoding="utf-8")
    return load_config(path=path, environ=container_environ()).config


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
    assert [v["name"] for v in described["volumes"]] == ["selfcheckd-tmp"]
    # The state bucket accepts its policy; the lease table is what the daemon expects.
    s3 = boto3.client("s3", region_name=REGION)
    s3.create_bucket(Bucket=VALUES["STATE_BUCKET"],
                     CreateBucketConfiguration={"LocationConstraint": REGION})
    s3.put_bucket_policy(Bucket=VALUES["STATE_BUCKET"],
                         Policy=json.dumps(render("s3-state-bucket-policy.json")))


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
    config = site_config(tmp_path)
    assert len(config.selfcheck.routes) == 1
    leakwatch = config.leakwatch
    assert leakwatch is not None
    task_stmts = statements("iam-task-role-policy.json")
    for group in leakwatch.cloudwatch.log_groups:
        arn = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{group}:*"
        assert grants(task_stmts, "logs:FilterLogEvents", arn), group
        # `config-check --connect` run in the task checks each group this way.
        assert grants(task_stmts, "logs:DescribeLogStreams", arn), group
    parameter = f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter{leakwatch.sinkhole_mode.parameter}"
    assert grants(task_stmts, "ssm:GetParameter", parameter)
    # The state is the S3 object the task role may read and write; the lease the one item
    # of the table it may touch.
    assert str(leakwatch.state_file) == f"s3://{VALUES['STATE_BUCKET']}/leakwatch-state.json"
    assert grants(task_stmts, "s3:GetObject", STATE_OBJECT)
    assert grants(task_stmts, "s3:PutObject", STATE_OBJECT)
    assert config.ha is not None
    assert config.ha.lease_table == VALUES["LEASE_TABLE"]
    (lease,) = [s for s in task_stmts if "dynamodb:UpdateItem" in as_list(s["Action"])]
    assert lease["Condition"]["ForAllValues:StringEquals"]["dynamodb:LeadingKeys"] == [
        config.ha.lease_key]
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


def test_stop_timeout_outlasts_the_whole_shutdown_budget(tmp_path: Path) -> None:
    """ECS's SIGKILL (stopTimeout) comes only after shutdown_grace + 5 s, the daemon's bound."""
    c = container()
    environment = {e["name"]: e["value"] for e in c["environment"]}
    if "SELFCHECKD_SHUTDOWN_GRACE" in environment:
        grace = float(environment["SELFCHECKD_SHUTDOWN_GRACE"])
    else:
        grace = Config().shutdown_grace
    # The daemon's own loader (site file + environment) agrees on the grace in force.
    assert site_config(tmp_path).shutdown_grace == grace
    assert grace + SHUTDOWN_OVERRUN < c["stopTimeout"] <= FARGATE_MAX_STOP_TIMEOUT


def test_health_check_is_the_images_healthz_probe() -> None:
    """The ECS health check calls /healthz with the same command as the image's HEALTHCHECK."""
    c = container()
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
    assert set(mounts) == {"/tmp"}  # the state is in S3
    assert set(mounts.values()) <= volumes


def test_two_tasks_keep_no_state_on_a_volume(tmp_path: Path) -> None:
    """No EFS and no state volume: the lease is in DynamoDB, the state in S3; /tmp alone is
    writable (task storage)."""
    td = render("task-definition.json")
    assert td["volumes"] == [{"name": "selfcheckd-tmp"}]
    assert not (ECS_DIR / "efs-file-system-policy.json").exists()
    leakwatch = site_config(tmp_path).leakwatch
    assert leakwatch is not None
    assert str(leakwatch.state_file).startswith("s3://")


def test_task_role_holds_only_the_lease_item_and_the_state_object() -> None:
    """DynamoDB: UpdateItem and GetItem on the lease table, for the lease key only. S3: get
    and put the one state object; ListBucket on its bucket (a missing object is then 404,
    not 403: the first leader starts afresh instead of failing)."""
    stmts = statements("iam-task-role-policy.json")
    (lease,) = [s for s in stmts if any(a.startswith("dynamodb:") for a in as_list(s["Action"]))]
    assert set(as_list(lease["Action"])) == {"dynamodb:UpdateItem", "dynamodb:GetItem"}
    assert as_list(lease["Resource"]) == [LEASE_TABLE]
    assert lease["Condition"] == {
        "ForAllValues:StringEquals": {"dynamodb:LeadingKeys": ["selfcheckd"]}}
    s3 = [s for s in stmts if any(a.startswith("s3:") for a in as_list(s["Action"]))]
    by_action = {a: as_list(s["Resource"]) for s in s3 for a in as_list(s["Action"])}
    assert by_action == {"s3:GetObject": [STATE_OBJECT], "s3:PutObject": [STATE_OBJECT],
                         "s3:ListBucket": [STATE_BUCKET]}
    assert not grants(stmts, "s3:PutObject", f"{STATE_BUCKET}/other.json")
    assert not grants(stmts, "dynamodb:DeleteItem", LEASE_TABLE)
    assert not grants(stmts, "dynamodb:CreateTable", LEASE_TABLE)


def test_the_daemon_calls_exactly_what_the_task_role_grants() -> None:
    """The DynamoDB and S3 actions the code declares it calls are the task role's grants
    for them (tests/test_ha_dynamodb.py records the calls a lease's life makes)."""
    from daemon.ha import IAM_ACTIONS as LEASE_ACTIONS

    stmts = statements("iam-task-role-policy.json")
    for action in LEASE_ACTIONS:
        assert grants(stmts, action, LEASE_TABLE), action
    granted = {a for s in stmts for a in as_list(s["Action"]) if a.startswith("dynamodb:")}
    assert granted == set(LEASE_ACTIONS)


def test_state_bucket_refuses_unconditional_writes_and_plain_http() -> None:
    """A PutObject without If-Match or If-None-Match is denied to everyone (so no writer,
    however buggy, overwrites another leader's state), and so is any request without TLS."""
    stmts = statements("s3-state-bucket-policy.json")
    assert all(s["Effect"] == "Deny" for s in stmts)
    (writes,) = [s for s in stmts if s["Action"] == "s3:PutObject"]
    assert writes["Condition"] == {"Null": {"s3:if-match": "true", "s3:if-none-match": "true"}}
    assert writes["Resource"] == f"{STATE_BUCKET}/*"
    (tls,) = [s for s in stmts if s["Action"] == "s3:*"]
    assert tls["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert set(tls["Resource"]) == {STATE_BUCKET, f"{STATE_BUCKET}/*"}


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
        if any(a.startswith("dynamodb:") for a in actions):
            assert s["Condition"]["ForAllValues:StringEquals"]["dynamodb:LeadingKeys"]


def test_task_role_reads_smtp_out_logs_and_sinkhole_mode_and_keeps_its_state() -> None:
    """The daemon may read smtp-out's logs and /cabal/sinkhole_mode, hold the lease and keep
    its state; no more."""
    stmts = statements("iam-task-role-policy.json")
    by_action = {a: as_list(s["Resource"]) for s in stmts for a in as_list(s["Action"])}
    assert by_action == {
        "logs:FilterLogEvents": [SMTP_OUT_LOG_GROUP],
        "logs:DescribeLogStreams": [SMTP_OUT_LOG_GROUP],
        "ssm:GetParameter": [SINKHOLE_MODE],
        "kms:Decrypt": [f"arn:aws:kms:{REGION}:{ACCOUNT}:key/*"],
        "dynamodb:UpdateItem": [LEASE_TABLE],
        "dynamodb:GetItem": [LEASE_TABLE],
        "s3:GetObject": [STATE_OBJECT],
        "s3:PutObject": [STATE_OBJECT],
        "s3:ListBucket": [STATE_BUCKET],
    }
    (kms,) = [s for s in stmts if s["Action"] == "kms:Decrypt"]
    assert kms["Condition"]["StringLike"]["kms:EncryptionContext:PARAMETER_ARN"] == [SINKHOLE_MODE]
    other_group = f"arn:aws:logs:{REGION}:{ACCOUNT}:log-group:/ecs/cabal-imap:*"
    assert not grants(stmts, "logs:FilterLogEvents", other_group)
    assert not grants(stmts, "logs:DescribeLogStreams", other_group)


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


def terraform_vars() -> set[str]:
    """The placeholder names main.tf's `locals.vars` fills for templatefile."""
    text = (TERRAFORM_DIR / "main.tf").read_text(encoding="utf-8")
    block = re.search(r"^  vars = \{\n(.*?)^  \}", text, re.M | re.S)
    assert block, "main.tf has no `vars = { ... }` in its locals"
    return set(re.findall(r"^\s+([A-Z][A-Z0-9_]*)\s*=", block.group(1), re.M))


def test_every_placeholder_is_documented_and_filled_by_terraform() -> None:
    """Each ${NAME} of the JSON templates is in the docs' table and in Terraform's vars."""
    names: set[str] = set()
    for path in sorted(ECS_DIR.glob("*.json")):
        names |= set(re.findall(r"\$\{([A-Z_]+)\}", path.read_text(encoding="utf-8")))
    assert {"STATE_BUCKET", "LEASE_TABLE"} <= names
    table = set(re.findall(r"^\| `([A-Z_]+)`(?:, `([A-Z_]+)`)?", DOCS.read_text(encoding="utf-8"),
                           re.M))
    documented = {name for row in table for name in row if name}
    assert names - documented == set()
    assert names - terraform_vars() == set()


def test_two_tasks_and_100_200_deployments_in_both_deploy_paths() -> None:
    """The docs' create-service and Terraform both run two tasks and start new ones before
    stopping old ones, so a standby is there through every deploy."""
    docs = DOCS.read_text(encoding="utf-8")
    assert "--desired-count 2" in docs
    assert "--deployment-configuration minimumHealthyPercent=100,maximumPercent=200" in docs
    tf = (TERRAFORM_DIR / "main.tf").read_text(encoding="utf-8")
    assert re.search(r"^\s*desired_count\s*=\s*2$", tf, re.M)
    assert re.search(r"^\s*deployment_minimum_healthy_percent\s*=\s*100$", tf, re.M)
    assert re.search(r"^\s*deployment_maximum_percent\s*=\s*200$", tf, re.M)


def test_docs_state_the_health_check_and_stop_timing() -> None:
    """docs/deploy-ecs.md gives the task definition's real health-check and stop numbers."""
    docs = DOCS.read_text(encoding="utf-8")
    c = container()
    hc = c["healthCheck"]
    interval, retries, start = hc["interval"], hc["retries"], hc["startPeriod"]
    times = "\N{MULTIPLICATION SIGN}"
    assert f"{interval} {times} {retries} + {start} = {interval * retries + start} s" in docs
    grace = float({e["name"]: e["value"] for e in c["environment"]}["SELFCHECKD_SHUTDOWN_GRACE"])
    bound = f"{grace + SHUTDOWN_OVERRUN:g} s"
    assert f"`stopTimeout` is {c['stopTimeout']} s" in docs
    assert bound in docs


def test_terraform_sketch_applies_against_a_mocked_provider(tmp_path: Path) -> None:
    """`terraform test` (mocked AWS) renders every template: two tasks, the lease table, the
    state bucket (versioned, encrypted, private, conditional writes only)."""
    terraform = shutil.which("terraform")
    if terraform is None or not TF_PLUGIN_DIR.is_dir():
        # Not a Debian package, so no install script can provide it: skip, never fail.
        pytest.skip(f"terraform or its provider mirror {TF_PLUGIN_DIR} is not installed")
    # A copy, so .terraform/ and the lock file never land in the work tree.
    work = tmp_path / "deploy"
    shutil.copytree(ECS_DIR, work / "ecs")
    shutil.copytree(TERRAFORM_DIR, work / "terraform",
                    ignore=shutil.ignore_patterns(".terraform*", "*.tfstate*"))
    env = {**os.environ, "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1"}
    init = ["init", "-backend=false", f"-plugin-dir={TF_PLUGIN_DIR}", "-input=false"]
    for args in (init, ["test"]):
        proc = subprocess.run([terraform, *args, "-no-color"], cwd=work / "terraform", env=env,
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, f"terraform {args[0]}:\n{proc.stdout}\n{proc.stderr}"
