variable "image" {
  description = "Site image (deploy/ecs/Dockerfile.site) in ECR, e.g. ACCOUNT.dkr.ecr.REGION.amazonaws.com/selfcheckd:0.1.0"
  type        = string
}
variable "selfcheck_from" {
  description = "MESSAGES_SELFCHECK_FROM, e.g. selfcheck@mail.example.com"
  type        = string
}
variable "selfcheck_to" {
  description = "MESSAGES_SELFCHECK_TO, e.g. selfcheck-receiver@mail.example.com"
  type        = string
}
variable "selfcheck_user" {
  description = "Cabalmail user for SMTP submission and IMAP login"
  type        = string
}
variable "cluster_arn" {
  description = "The cabal-mail ECS cluster"
  type        = string
}
variable "vpc_id" {
  type = string
}
variable "private_subnet_ids" {
  description = "Where the tasks run; two or more AZs, so one AZ's outage leaves a task to lead"
  type        = list(string)
}
variable "state_bucket" {
  description = "S3 bucket for the leak watcher's state (a globally unique name), e.g. selfcheckd-state-123456789012"
  type        = string
}
variable "lease_table" {
  description = "DynamoDB table holding the [ha] lease"
  type        = string
  default     = "selfcheckd-lease"
}
variable "prometheus_security_group_id" {
  type = string
}
variable "cloudmap_namespace_id" {
  description = "Cloud Map private DNS namespace (cabal.internal)"
  type        = string
}
