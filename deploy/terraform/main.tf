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
    # The state volume (task-definition.json, iam-task-role-policy.json,
    # efs-file-system-policy.json). Until the file system exists, a plan
    # shows the rendered task definition and policies as known after apply.
    STATE_EFS_FILE_SYSTEM_ID  = aws_efs_file_system.state.id
    STATE_EFS_ACCESS_POINT_ID = aws_efs_access_point.state.id
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

  dynamic "volume" {
    for_each = local.task_definition.volumes
    content {
      name = volume.value.name
      # selfcheckd-state is on EFS (the state file must outlive the task);
      # selfcheckd-tmp stays task storage.
      dynamic "efs_volume_configuration" {
        for_each = can(volume.value.efsVolumeConfiguration) ? [volume.value.efsVolumeConfiguration] : []
        content {
          file_system_id     = efs_volume_configuration.value.fileSystemId
          transit_encryption = efs_volume_configuration.value.transitEncryption
          authorization_config {
            access_point_id = efs_volume_configuration.value.authorizationConfig.accessPointId
            iam             = efs_volume_configuration.value.authorizationConfig.iam
          }
        }
      }
    }
  }
}

# The leak watcher's state file (CloudWatch cursor, detector memory, alert
# outbox) on EFS, so it survives task replacement: every deploy and every
# replacement after a failed /healthz. A few KB: it costs next to nothing.
resource "aws_efs_file_system" "state" {
  creation_token = "selfcheckd-state"
  encrypted      = true
  tags           = { Name = "selfcheckd-state" }
}

# The task sees only /selfcheckd, always as uid/gid 10001 (the image's user),
# whatever uid the client claims; EFS creates the directory on first mount.
resource "aws_efs_access_point" "state" {
  file_system_id = aws_efs_file_system.state.id
  posix_user {
    uid = 10001
    gid = 10001
  }
  root_directory {
    path = "/selfcheckd"
    creation_info {
      owner_uid   = 10001
      owner_gid   = 10001
      permissions = "0750"
    }
  }
  tags = { Name = "selfcheckd-state" }
}

# Without a file system policy EFS lets in any client that reaches a mount
# target; this one (deploy/ecs/efs-file-system-policy.json) admits only the
# task role, through the access point, over TLS.
resource "aws_efs_file_system_policy" "state" {
  file_system_id = aws_efs_file_system.state.id
  policy         = templatefile("${local.ecs_dir}/efs-file-system-policy.json", local.vars)
  # The policy names the task role; EFS rejects a principal that does not exist yet.
  depends_on = [aws_iam_role.task]
}

# One mount target per subnet the service runs in (EFS allows one per AZ:
# give the service one private subnet per AZ).
resource "aws_efs_mount_target" "state" {
  for_each        = toset(var.private_subnet_ids)
  file_system_id  = aws_efs_file_system.state.id
  subnet_id       = each.value
  security_groups = [aws_security_group.state_efs.id]
}

resource "aws_security_group" "state_efs" {
  name   = "selfcheckd-state-efs"
  vpc_id = var.vpc_id
  ingress {
    description     = "NFS from the selfcheckd task only"
    from_port       = 2049
    to_port         = 2049
    protocol        = "tcp"
    security_groups = [aws_security_group.selfcheckd.id]
  }
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
    description = "SMTP submission, IMAP, CloudWatch Logs, SSM, heartbeat and alert_sink over HTTPS, NFS to the state EFS"
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
  # Exactly one: two tasks would double the probes and the leak alerts, and
  # both would write the one state file. 0/100 makes a deploy (and the
  # replacement of an unhealthy task) stop the old task before starting the
  # new one: a gap of about a minute, which the state file bridges (see
  # docs/deploy-ecs.md, "State across task replacements").
  desired_count                      = 1
  deployment_minimum_healthy_percent = 0
  deployment_maximum_percent         = 100
  # EFS volumes on Fargate need platform 1.4.0 or later (LATEST is).
  platform_version = "LATEST"

  network_configuration {
    subnets         = var.private_subnet_ids
    security_groups = [aws_security_group.selfcheckd.id]
  }
  service_registries {
    registry_arn = aws_service_discovery_service.selfcheckd.arn
  }
  # The task cannot start before it can mount its state.
  depends_on = [aws_efs_mount_target.state, aws_efs_file_system_policy.state]
}
