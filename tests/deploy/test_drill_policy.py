"""deploy/ecs/iam-drill-policy.json: what the drill's ECS driver needs, and nothing more."""

from __future__ import annotations

import json
from collections.abc import Iterator

import boto3  # type: ignore[import-untyped]
import pytest
from moto import mock_aws

from daemon.drill.drivers.ecs import IAM_ACTIONS
from tests.deploy.test_ecs import ACCOUNT, REGION, SINKHOLE_MODE, as_list, grants, statements

POLICY = "iam-drill-policy.json"
CLUSTER = f"arn:aws:ecs:{REGION}:{ACCOUNT}:cluster/cabal-mail"
A_TASK = f"arn:aws:ecs:{REGION}:{ACCOUNT}:task/cabal-mail/0123456789abcdef"
SERVICE = f"arn:aws:ecs:{REGION}:{ACCOUNT}:service/cabal-mail/cabal-smtp-out"


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        yield


def test_drill_policy_is_valid_iam(aws: None) -> None:
    """IAM (moto's grammar checks) accepts the drill policy as a managed policy."""
    from tests.deploy.test_ecs import render

    iam = boto3.client("iam", region_name=REGION)
    iam.create_policy(PolicyName="selfcheckd-drill", PolicyDocument=json.dumps(render(POLICY)))


def test_drill_policy_grants_every_action_the_driver_calls_and_no_other() -> None:
    """The policy's ECS actions are exactly those the ECS driver calls; SSM only reads and
    writes the sinkhole's parameter."""
    stmts = statements(POLICY)
    actions = {a for s in stmts for a in as_list(s["Action"])}
    assert {a for a in actions if a.startswith("ecs:")} == IAM_ACTIONS
    assert {a for a in actions if not a.startswith("ecs:")} == {"ssm:GetParameter",
                                                                "ssm:PutParameter"}
    assert grants(stmts, "ssm:PutParameter", SINKHOLE_MODE)
    assert not grants(stmts, "ssm:PutParameter",
                      f"arn:aws:ssm:{REGION}:{ACCOUNT}:parameter/cabal/other")
    assert grants(stmts, "ecs:StopTask", A_TASK)
    assert not grants(stmts, "ecs:StopTask",
                      f"arn:aws:ecs:{REGION}:{ACCOUNT}:task/other-cluster/0123")
    assert grants(stmts, "ecs:DescribeServices", SERVICE)
    assert grants(stmts, "ecs:ExecuteCommand", CLUSTER)


def test_drill_policy_is_least_privilege() -> None:
    """No wildcard action, no Resource "*", every ECS task/exec grant held to the cluster
    or the smtp-out container by a condition."""
    for s in statements(POLICY):
        assert s["Effect"] == "Allow"
        assert not {"NotAction", "NotResource", "NotPrincipal"} & set(s)
        assert all("*" not in a for a in as_list(s["Action"]))
        assert "*" not in as_list(s["Resource"])
        if set(as_list(s["Action"])) & {"ecs:ListTasks", "ecs:DescribeTasks", "ecs:StopTask"}:
            assert s["Condition"]["ArnEquals"]["ecs:cluster"] == CLUSTER
        if "ecs:ExecuteCommand" in as_list(s["Action"]):
            assert s["Condition"]["StringEquals"]["ecs:container-name"] == "smtp-out"
