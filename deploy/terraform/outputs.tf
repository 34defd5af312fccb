output "ecr_repository_url" {
  value = aws_ecr_repository.api.repository_url
}

output "cluster_name" {
  value = aws_ecs_cluster.main.name
}

output "service_name" {
  value = aws_ecs_service.api.name
}

output "task_definition_family" {
  value = aws_ecs_task_definition.api.family
}

output "load_balancer_dns" {
  value = aws_lb.api.dns_name
}

output "log_group" {
  value = aws_cloudwatch_log_group.api.name
}

output "api_keys_secret_arn" {
  value = local.api_keys_secret_arn
}

output "github_deploy_role_arn" {
  value = local.github_enabled ? aws_iam_role.github_deploy[0].arn : ""
}

output "alarm_topic_arn" {
  value = local.alarm_topic_arn
}

output "logs_bucket" {
  value = aws_s3_bucket.logs.id
}

output "audit_file_system_id" {
  value = aws_efs_file_system.audit.id
}

output "audit_access_point_id" {
  value = aws_efs_access_point.audit.id
}
