# API keys live in Secrets Manager, never in code or state: Terraform creates the (empty) secret, an
# operator puts the value (docs/operations.md, "Rotate API keys"), ECS injects it as RETINAGRADE_API_KEYS.
resource "aws_secretsmanager_secret" "api_keys" {
  count                   = var.api_keys_secret_arn == "" ? 1 : 0
  name                    = "${var.name}/api-keys"
  description             = "Comma-separated API keys accepted by the retinagrade API (RETINAGRADE_API_KEYS)"
  recovery_window_in_days = 7
}

resource "aws_ssm_parameter" "model_version" {
  name        = "/${var.name}/model-version"
  description = "Model version the service is expected to serve (set by Terraform; read by CI and dashboards)"
  type        = "String"
  value       = var.model_version
}

locals {
  api_keys_secret_arn = var.api_keys_secret_arn != "" ? var.api_keys_secret_arn : aws_secretsmanager_secret.api_keys[0].arn
}
