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
  description = "CloudWatch log retention."
  type        = number
  default     = 90
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
  description = "ACM certificate for HTTPS on the load balancer; empty: HTTP only (testing only: images are health data)."
  type        = string
  default     = ""
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
  description = "SNS topic for alarm notifications; empty: alarms without actions."
  type        = string
  default     = ""
}

variable "github_repository" {
  description = "owner/name of the GitHub repository allowed to deploy through OIDC; empty: no deploy role."
  type        = string
  default     = ""
}

variable "github_oidc_provider_arn" {
  description = "Existing GitHub OIDC provider in the account; empty: create it (one per account)."
  type        = string
  default     = ""
}
