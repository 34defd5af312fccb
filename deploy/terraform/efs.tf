# The audit store (SQLite) on EFS, so it outlives every task and every deploy. One file per task
# (ecs.tf names it after the task's host name): SQLite must have a single writer per file, and NFS locks
# are not to be relied on across hosts. Backups: an AWS Backup plan of the account (docs/operations.md).
resource "aws_efs_file_system" "audit" {
  #checkov:skip=CKV_AWS_184:encrypted at rest with the AWS-managed EFS key; a customer-managed key is an account-level choice
  creation_token = "${var.name}-audit"
  encrypted      = true
  tags           = { Name = "${var.name}-audit" }
}

resource "aws_efs_mount_target" "audit" {
  count           = 2
  file_system_id  = aws_efs_file_system.audit.id
  subnet_id       = aws_subnet.public[count.index].id
  security_groups = [aws_security_group.efs.id]
}

# The service runs as uid 10001 (Dockerfile); the access point makes every access that user, in /audit.
resource "aws_efs_access_point" "audit" {
  file_system_id = aws_efs_file_system.audit.id
  posix_user {
    uid = 10001
    gid = 10001
  }
  root_directory {
    path = "/audit"
    creation_info {
      owner_uid   = 10001
      owner_gid   = 10001
      permissions = "0750"
    }
  }
  tags = { Name = "${var.name}-audit" }
}

data "aws_iam_policy_document" "audit_file_system" {
  statement {
    sid     = "TasksThroughTheAccessPoint"
    actions = ["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite"]
    principals {
      type        = "AWS"
      identifiers = [aws_iam_role.task.arn]
    }
    resources = [aws_efs_file_system.audit.arn]
    condition {
      test     = "StringEquals"
      variable = "elasticfilesystem:AccessPointArn"
      values   = [aws_efs_access_point.audit.arn]
    }
  }
  statement {
    sid     = "TlsOnly"
    effect  = "Deny"
    actions = ["*"]
    principals {
      type        = "AWS"
      identifiers = ["*"]
    }
    resources = [aws_efs_file_system.audit.arn]
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_efs_file_system_policy" "audit" {
  file_system_id = aws_efs_file_system.audit.id
  policy         = data.aws_iam_policy_document.audit_file_system.json
}
