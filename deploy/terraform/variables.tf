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
  description = "Where the task runs; one per AZ, since each gets the state file system's mount target"
  type        = list(string)
}
variable "prometheus_security_group_id" {
  type = string
}
variable "cloudmap_namespace_id" {
  description = "Cloud Map private DNS namespace (cabal.internal)"
  type        = string
}
