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
    defaults = { arn = "arn:aws:iam::123456789012:role/selfcheckd-task" }
  }
  mock_resource "aws_service_discovery_service" {
    defaults = { arn = "arn:aws:servicediscovery:eu-west-1:123456789012:service/srv-0123456789abcdef" }
  }
  mock_resource "aws_dynamodb_table" {
    defaults = { arn = "arn:aws:dynamodb:eu-west-1:123456789012:table/selfcheckd-lease" }
  }
  mock_resource "aws_s3_bucket" {
    defaults = {
      arn = "arn:aws:s3:::selfcheckd-state-123456789012"
      id  = "selfcheckd-state-123456789012"
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
  state_bucket                 = "selfcheckd-state-123456789012"
}

run "two_tasks_one_lease_state_in_s3" {
  command = apply

  assert {
    condition = (
      aws_ecs_service.selfcheckd.desired_count == 2
      && aws_ecs_service.selfcheckd.deployment_minimum_healthy_percent == 100
      && aws_ecs_service.selfcheckd.deployment_maximum_percent == 200
    )
    error_message = "Two tasks, and a deploy starts the new ones before stopping the old (100/200)."
  }

  assert {
    condition = (
      aws_dynamodb_table.lease.billing_mode == "PAY_PER_REQUEST"
      && aws_dynamodb_table.lease.hash_key == "key"
      && length(aws_dynamodb_table.lease.range_key == null ? [] : [1]) == 0
      && anytrue([for a in aws_dynamodb_table.lease.attribute : a.name == "key" && a.type == "S"])
      && length(aws_dynamodb_table.lease.attribute) == 1
    )
    error_message = "The lease table: on demand, one string hash key named `key`, nothing else."
  }

  assert {
    condition = (
      aws_dynamodb_table.lease.ttl[0].enabled
      && aws_dynamodb_table.lease.ttl[0].attribute_name == "ttl"
    )
    error_message = "TTL on the lease item's `ttl` attribute (a week past its expiry)."
  }

  assert {
    condition     = aws_s3_bucket_versioning.state.versioning_configuration[0].status == "Enabled"
    error_message = "The state bucket is versioned."
  }

  assert {
    condition = anytrue([
      for r in aws_s3_bucket_server_side_encryption_configuration.state.rule :
      r.apply_server_side_encryption_by_default[0].sse_algorithm == "AES256"
    ])
    error_message = "The state bucket encrypts at rest (SSE-S3: no KMS grant needed)."
  }

  assert {
    condition = (
      aws_s3_bucket_public_access_block.state.block_public_acls
      && aws_s3_bucket_public_access_block.state.block_public_policy
      && aws_s3_bucket_public_access_block.state.ignore_public_acls
      && aws_s3_bucket_public_access_block.state.restrict_public_buckets
    )
    error_message = "The state bucket blocks every form of public access."
  }

  assert {
    condition = anytrue([
      for s in jsondecode(aws_s3_bucket_policy.state.policy).Statement : (
        s.Effect == "Deny" && s.Action == "s3:PutObject"
        && try(s.Condition.Null["s3:if-match"], "") == "true"
        && try(s.Condition.Null["s3:if-none-match"], "") == "true"
      )
    ])
    error_message = "The bucket refuses writes without If-Match / If-None-Match."
  }

  assert {
    condition = anytrue([
      for s in jsondecode(aws_iam_role_policy.task.policy).Statement : (
        s.Resource == "arn:aws:dynamodb:eu-west-1:123456789012:table/${aws_dynamodb_table.lease.name}"
        && toset(flatten([s.Action])) == toset(["dynamodb:UpdateItem", "dynamodb:GetItem"])
      )
    ])
    error_message = "The task role may update and read the lease table, nothing else of DynamoDB."
  }

  assert {
    condition = anytrue([
      for s in jsondecode(aws_iam_role_policy.task.policy).Statement : (
        s.Resource == "arn:aws:s3:::${aws_s3_bucket.state.bucket}/leakwatch-state.json"
        && toset(flatten([s.Action])) == toset(["s3:GetObject", "s3:PutObject"])
      )
    ])
    error_message = "The task role may read and write the state object, and no other."
  }

  assert {
    condition = alltrue([
      for v in aws_ecs_task_definition.selfcheckd.volume : length(v.efs_volume_configuration) == 0
    ])
    error_message = "No EFS volume: the state is in S3."
  }
}
