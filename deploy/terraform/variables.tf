variable "region" {
  description = "AWS region."
  type        = string
  default     = "eu-west-1"
}

variable "name" {
  description = "Name prefix of every resource."
  type        = string
  default     = "retinagrade"
}

variable "tags" {
  description = "Extra tags on every resource."
  type        = map(string)
  default     = {}
}

variable "image_tag" {
  description = "Image tag in the ECR repository for the first task definition (later deploys come from CI)."
  type        = string
  default     = "latest"
}

variable "model_version" {
  description = "Version of the model inside the image (from models/retinagrade-dr.json); shown in tags and the task's environment."
  type        = string
}

variable "task_cpu" {
  description = "Fargate task CPU units (1024 = 1 vCPU)."
  type        = number
  default     = 2048
}

variable "task_memory" {
  description = "Fargate task memory (MiB)."
  type        = number
  default     = 4096
}

variable "onnx_threads" {
  description = "RETINAGRADE_THREADS: ONNX Runtime intra-op threads per task (match the task's vCPUs)."
  type        = number
  default     = 2
}

variable "min_capacity" {
  description = "Fewest running tasks (2: one per availability zone)."
  type        = number
  default     = 2
}

variable "max_capacity" {
  description = "Most running tasks."
  type        = number
  default     = 10
}

variable "cpu_target_percent" {
  description = "Target-tracking goal for the service's average CPU."
  type        = number
  default     = 60
}

variable "requests_per_target" {
  description = "Target-tracking goal for ALB requests per task per minute."
  type        = number
  default     = 300
}

variable "log_retention_days" {
  description = "CloudWatch log retention (a year: the service's request log is part of its audit trail)."
  type        = number
  default     = 365
}

variable "access_log_retention_days" {
  description = "Days the ALB access logs and VPC flow logs stay in their S3 bucket."
  type        = number
  default     = 365
}

variable "vpc_cidr" {
  description = "CIDR of the VPC this module creates (two public subnets; tasks get public IPs, no NAT gateway)."
  type        = string
  default     = "10.42.0.0/16"
}

variable "allowed_cidrs" {
  description = "Who may reach the load balancer."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "certificate_arn" {
  description = "ACM certificate for the HTTPS listener. Required unless allow_plain_http = true."
  type        = string
  default     = ""
}

variable "allow_plain_http" {
  description = "Explicit opt-in, for a test stack only: without a certificate, serve plain HTTP on port 80 (images are health data: never in production)."
  type        = bool
  default     = false
}

variable "deletion_protection" {
  description = "Protect the load balancer from deletion (turn off to destroy a test stack)."
  type        = bool
  default     = true
}

variable "api_keys_secret_arn" {
  description = "Existing Secrets Manager secret holding RETINAGRADE_API_KEYS (comma-separated); empty: create one, whose value is set out of band (docs/operations.md)."
  type        = string
  default     = ""
}

variable "latency_alarm_seconds" {
  description = "Alarm when the ALB's p95 target response time exceeds this."
  type        = number
  default     = 1
}

variable "alarm_topic_arn" {
  description = "Existing SNS topic for alarm notifications; empty: create one (subscribe with alarm_emails)."
  type        = string
  default     = ""
}

variable "alarm_emails" {
  description = "E-mail addresses subscribed to the created alarm topic (each confirms by e-mail)."
  type        = list(string)
  default     = []
}

variable "github_repository" {
  description = "owner/name of the GitHub repository allowed to deploy through OIDC; empty: no deploy role."
  type        = string
  default     = ""
}

variable "github_environment" {
  description = "GitHub environment of the deploy job (.github/workflows/deploy.yml): its OIDC token's subject is repo:<github_repository>:environment:<this>. Restrict who may deploy with that environment's deployment branch rules (main and v* tags)."
  type        = string
  default     = "production"
}

variable "github_oidc_provider_arn" {
  description = "Existing GitHub OIDC provider in the account; empty: create it (one per account)."
  type        = string
  default     = ""
}
