# Sketch: selfcheckd as an ECS service in Cabalmail's cluster, built from the
# same files as the manual path (deploy/ecs/*.json are templatefile-compatible:
# both use ${NAME} placeholders). Not validated in CI; adapt names to your stack.

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
    }
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
    description = "SMTP submission, IMAP, CloudWatch Logs, SSM, heartbeat and alert_sink over HTTPS"
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
  # Exactly one: two tasks would double the probes and the leak alerts.
  desired_count                      = 1
  deployment_minimum_healthy_percent = 0
  deployment_maximum_percent         = 100

  network_configuration {
    subnets         = var.private_subnet_ids
    security_groups = [aws_security_group.selfcheckd.id]
  }
  service_registries {
    registry_arn = aws_service_discovery_service.selfcheckd.arn
  }
}
