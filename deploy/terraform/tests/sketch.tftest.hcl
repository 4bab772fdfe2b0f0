# `terraform test` for the sketch, offline: the AWS provider is mocked, so an
# apply only evaluates the configuration (templatefile fills every
# placeholder of deploy/ecs/*.json or fails; the provider checks ARNs and
# block shapes). tests/deploy/test_ecs.py runs it when terraform and a local
# provider mirror are available.

mock_provider "aws" {
  mock_data "aws_region" {
    defaults = { name = "eu-west-1" }
  }
  mock_data "aws_caller_identity" {
    defaults = { account_id = "123456789012" }
  }
  mock_resource "aws_iam_role" {
    # Both roles get this ARN; the file system policy names the task role by it.
    defaults = { arn = "arn:aws:iam::123456789012:role/selfcheckd-task" }
  }
  mock_resource "aws_service_discovery_service" {
    defaults = { arn = "arn:aws:servicediscovery:eu-west-1:123456789012:service/srv-0123456789abcdef" }
  }
  mock_resource "aws_efs_file_system" {
    defaults = {
      id  = "fs-0123456789abcdef0"
      arn = "arn:aws:elasticfilesystem:eu-west-1:123456789012:file-system/fs-0123456789abcdef0"
    }
  }
  mock_resource "aws_efs_access_point" {
    defaults = {
      id  = "fsap-0123456789abcdef0"
      arn = "arn:aws:elasticfilesystem:eu-west-1:123456789012:access-point/fsap-0123456789abcdef0"
    }
  }
}

variables {
  image                        = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/selfcheckd:0.1.0"
  selfcheck_from               = "selfcheck@mail.example.com"
  selfcheck_to                 = "selfcheck-receiver@mail.example.com"
  selfcheck_user               = "selfcheck"
  cluster_arn                  = "arn:aws:ecs:eu-west-1:123456789012:cluster/cabal-mail"
  vpc_id                       = "vpc-0123456789abcdef0"
  private_subnet_ids           = ["subnet-0aaaaaaaaaaaaaaaa", "subnet-0bbbbbbbbbbbbbbbb"]
  prometheus_security_group_id = "sg-0123456789abcdef0"
  cloudmap_namespace_id        = "ns-0123456789abcdef0"
}

run "state_on_efs_one_task_at_a_time" {
  command = apply

  assert {
    condition = alltrue([
      for v in aws_ecs_task_definition.selfcheckd.volume : (
        v.efs_volume_configuration[0].file_system_id == aws_efs_file_system.state.id
        && v.efs_volume_configuration[0].transit_encryption == "ENABLED"
        && v.efs_volume_configuration[0].authorization_config[0].access_point_id == aws_efs_access_point.state.id
        && v.efs_volume_configuration[0].authorization_config[0].iam == "ENABLED"
      ) if v.name == "selfcheckd-state"
    ])
    error_message = "The selfcheckd-state volume must be the EFS file system, through its access point, with TLS and IAM."
  }

  assert {
    condition = length([
      for v in aws_ecs_task_definition.selfcheckd.volume : v
      if v.name == "selfcheckd-state" && length(v.efs_volume_configuration) == 1
    ]) == 1
    error_message = "The task definition has no EFS-backed selfcheckd-state volume."
  }

  assert {
    condition = (
      aws_efs_access_point.state.posix_user[0].uid == 10001
      && aws_efs_access_point.state.posix_user[0].gid == 10001
      && aws_efs_access_point.state.root_directory[0].creation_info[0].owner_uid == 10001
      && aws_efs_access_point.state.root_directory[0].creation_info[0].owner_gid == 10001
    )
    error_message = "The access point must act as, and create its directory for, the image's uid/gid 10001."
  }

  assert {
    condition     = length(aws_efs_mount_target.state) == length(var.private_subnet_ids)
    error_message = "Every subnet the service runs in needs a mount target."
  }

  assert {
    condition = anytrue([
      for rule in aws_security_group.state_efs.ingress : (
        rule.from_port == 2049 && rule.to_port == 2049 && rule.protocol == "tcp"
        && rule.security_groups == toset([aws_security_group.selfcheckd.id])
        && length(coalesce(rule.cidr_blocks, [])) == 0
      )
    ]) && length(aws_security_group.state_efs.ingress) == 1
    error_message = "NFS (2049) must be open to the selfcheckd task's security group only."
  }

  assert {
    condition = anytrue([
      for s in jsondecode(aws_iam_role_policy.task.policy).Statement : (
        s.Resource == aws_efs_file_system.state.arn
        && s.Condition.StringEquals["elasticfilesystem:AccessPointArn"] == aws_efs_access_point.state.arn
      ) if can(s.Condition.StringEquals["elasticfilesystem:AccessPointArn"])
    ])
    error_message = "The task role's EFS grant must name this file system and its access point."
  }

  assert {
    condition = anytrue([
      for s in jsondecode(aws_efs_file_system_policy.state.policy).Statement : (
        s.Effect == "Allow" && s.Principal.AWS == aws_iam_role.task.arn
        && s.Resource == aws_efs_file_system.state.arn
        && try(s.Condition.StringEquals["elasticfilesystem:AccessPointArn"], "") == aws_efs_access_point.state.arn
      )
    ])
    error_message = "The file system policy must admit the task role through the access point."
  }

  assert {
    condition = (
      aws_ecs_service.selfcheckd.desired_count == 1
      && aws_ecs_service.selfcheckd.deployment_minimum_healthy_percent == 0
      && aws_ecs_service.selfcheckd.deployment_maximum_percent == 100
    )
    error_message = "One task, and a deploy stops the old task before starting the new one (0/100)."
  }
}
