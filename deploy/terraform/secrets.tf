# API keys live in Secrets Manager, never in code or state: Terraform creates the (empty) secret, an
# operator puts the value (docs/operations.md, "Rotate API keys"), ECS injects it as RETINAGRADE_API_KEYS.
resource "aws_secretsmanager_secret" "api_keys" {
  #checkov:skip=CKV_AWS_149:encrypted with the AWS-managed Secrets Manager key; a customer-managed key would need a key policy and kms:Decrypt for the execution role, an account-level choice
  #checkov:skip=CKV2_AWS_57:keys are issued to hospitals and rotated by an operator with a grace period (docs/operations.md, "Rotate API keys"); an automatic rotation would lock clients out
  count                   = var.api_keys_secret_arn == "" ? 1 : 0
  name                    = "${var.name}/api-keys"
  description             = "Comma-separated API keys accepted by the retinagrade API (RETINAGRADE_API_KEYS)"
  recovery_window_in_days = 7
}

resource "aws_ssm_parameter" "model_version" {
  #checkov:skip=CKV2_AWS_34:the model version is public (image label, /v1/model); nothing secret to encrypt
  name        = "/${var.name}/model-version"
  description = "Model version the service is expected to serve (set by Terraform; read by CI and dashboards)"
  type        = "String"
  value       = var.model_version
}

locals {
  api_keys_secret_arn = var.api_keys_secret_arn != "" ? var.api_keys_secret_arn : aws_secretsmanager_secret.api_keys[0].arn
}
