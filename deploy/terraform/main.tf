# Sketch: selfcheckd as an ECS service in Cabalmail's cluster, built from the
# same files as the manual path (deploy/ecs/*.json are templatefile-compatible:
# both use ${NAME} placeholders); adapt names to your stack. tests/sketch.tftest.hcl
# applies it against a mocked AWS provider (tests/deploy/test_ecs.py runs it).

terraform {
  required_providers {
    aws = { source = "hashicorp/aws", version = ">= 5.0" }
  }
}

data "aws_region" "current" {}
data "aws_caller_identity" "current" {}

locals {
  ecs_dir = "${path.module}/../ecs"
  vars = {
    AWS_REGION       = data.aws_region.current.name
    AWS_ACCOUNT_ID   = data.aws_caller_identity.current.account_id
    SELFCHECKD_IMAGE = var.image
    SELFCHECK_FROM   = var.selfcheck_from
    SELFCHECK_TO     = var.selfcheck_to
    SELFCHECK_USER   = var.selfcheck_user
    # Where the two tasks keep the lease and the leak watcher's state
    # (iam-task-role-policy.json, s3-state-bucket-policy.json, selfcheckd.toml).
    LEASE_TABLE  = aws_dynamodb_table.lease.name
    STATE_BUCKET = aws_s3_bucket.state.bucket
  }
  task_definition = jsondecode(templatefile("${local.ecs_dir}/task-definition.json", local.vars))
}

resource "aws_cloudwatch_log_group" "selfcheckd" {
  name              = "/ecs/selfcheckd"
  retention_in_days = 30
}

resource "aws_iam_role" "task" {
  name               = "selfcheckd-task"
  assume_role_policy = templatefile("${local.ecs_dir}/iam-trust-policy.json", local.vars)
}

resource "aws_iam_role_policy" "task" {
  name   = "selfcheckd-task"
  role   = aws_iam_role.task.id
  policy = templatefile("${local.ecs_dir}/iam-task-role-policy.json", local.vars)
}

resource "aws_iam_role" "execution" {
  name               = "selfcheckd-execution"
  assume_role_policy = templatefile("${local.ecs_dir}/iam-trust-policy.json", local.vars)
}

resource "aws_iam_role_policy" "execution" {
  name   = "selfcheckd-execution"
  role   = aws_iam_role.execution.id
  policy = templatefile("${local.ecs_dir}/iam-execution-role-policy.json", local.vars)
}

resource "aws_ecs_task_definition" "selfcheckd" {
  family                   = local.task_definition.family
  task_role_arn            = aws_iam_role.task.arn
  execution_role_arn       = aws_iam_role.execution.arn
  network_mode             = local.task_definition.networkMode
  requires_compatibilities = local.task_definition.requiresCompatibilities
  cpu                      = local.task_definition.cpu
  memory                   = local.task_definition.memory
  container_definitions    = jsonencode(local.task_definition.containerDefinitions)

  # selfcheckd-tmp (/tmp) is task storage; the state is in S3, the lease in DynamoDB.
  dynamic "volume" {
    for_each = local.task_definition.volumes
    content {
      name = volume.value.name
    }
  }
}

# The lease (docs/ha.md): one item, written only with condition expressions.
# On demand: a few writes a second at most, never throttled by a provisioned
# capacity. TTL removes a lease nobody held for a week (its `ttl` attribute
# is a week past its expiry); the lease's own expiry never waits for TTL.
resource "aws_dynamodb_table" "lease" {
  name                        = var.lease_table
  billing_mode                = "PAY_PER_REQUEST"
  hash_key                    = "key"
  deletion_protection_enabled = true

  attribute {
    name = "key"
    type = "S"
  }

  ttl {
    attribute_name = "ttl"
    enabled        = true
  }

  server_side_encryption {
    enabled = true
  }
}

# The leak watcher's state (CloudWatch cursor, detector memory, alert outbox),
# read whole by each new leader and written only with conditional puts.
resource "aws_s3_bucket" "state" {
  bucket = var.state_bucket
}

# Versions: an unusable state is kept as a noncurrent version (the leader
# starts afresh and says so), and any earlier save can be restored by hand.
resource "aws_s3_bucket_versioning" "state" {
  bucket = aws_s3_bucket.state.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "state" {
  bucket = aws_s3_bucket.state.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_public_access_block" "state" {
  bucket                  = aws_s3_bucket.state.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "state" {
  bucket = aws_s3_bucket.state.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

# The state is rewritten every few seconds while leaks and positions move:
# keep the 50 newest noncurrent versions, drop older ones after a day.
resource "aws_s3_bucket_lifecycle_configuration" "state" {
  bucket = aws_s3_bucket.state.id
  rule {
    id     = "noncurrent-state-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days           = 1
      newer_noncurrent_versions = 50
    }
  }
  depends_on = [aws_s3_bucket_versioning.state]
}

# Writes without If-Match / If-None-Match are refused (a bug could not
# overwrite a successor's state), and everything is over TLS.
resource "aws_s3_bucket_policy" "state" {
  bucket     = aws_s3_bucket.state.id
  policy     = templatefile("${local.ecs_dir}/s3-state-bucket-policy.json", local.vars)
  depends_on = [aws_s3_bucket_public_access_block.state]
}

resource "aws_service_discovery_service" "selfcheckd" {
  name = "selfcheckd"
  dns_config {
    namespace_id = var.cloudmap_namespace_id # the cabal.internal namespace
    dns_records {
      type = "A"
      ttl  = 10
    }
  }
}

resource "aws_security_group" "selfcheckd" {
  name   = "selfcheckd"
  vpc_id = var.vpc_id
  ingress {
    description     = "Prometheus scrapes /metrics"
    from_port       = 9787
    to_port         = 9787
    protocol        = "tcp"
    security_groups = [var.prometheus_security_group_id]
  }
  egress {
    description = "SMTP submission, IMAP, CloudWatch Logs, SSM, DynamoDB, S3, heartbeat and alert_sink over HTTPS"
    from_port   = 0
    to_port     = 0
    protocol    = "-1"
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_ecs_service" "selfcheckd" {
  name            = "selfcheckd"
  cluster         = var.cluster_arn
  task_definition = aws_ecs_task_definition.selfcheckd.arn
  launch_type     = "FARGATE"
  # Two tasks, one leader (docs/ha.md): the task holding the DynamoDB lease
  # does the work, the other stands by and takes over within 15 s of its
  # death, within 5 s of its stop. 100/200: a deploy starts the new tasks
  # before it stops the old ones, so a standby is always there.
  desired_count                      = 2
  deployment_minimum_healthy_percent = 100
  deployment_maximum_percent         = 200
  # The task metadata endpoint v4 (the holder id names the task) needs 1.4.0.
  platform_version = "LATEST"

  network_configuration {
    subnets         = var.private_subnet_ids
    security_groups = [aws_security_group.selfcheckd.id]
  }
  service_registries {
    registry_arn = aws_service_discovery_service.selfcheckd.arn
  }
}
