resource "aws_ecs_cluster" "main" {
  name = var.name
  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}

locals {
  image          = "${aws_ecr_repository.api.repository_url}:${var.image_tag}"
  container_name = "api"
  audit_dir      = "/var/lib/retinagrade/audit"
}

resource "aws_ecs_task_definition" "api" {
  family                   = var.name
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = var.task_cpu
  memory                   = var.task_memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn
  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = "X86_64"
  }

  # The root file system is read-only; the task writes only to /tmp (task storage) and the audit store.
  volume {
    name = "tmp"
  }
  volume {
    name = "audit"
    efs_volume_configuration {
      file_system_id     = aws_efs_file_system.audit.id
      transit_encryption = "ENABLED"
      authorization_config {
        access_point_id = aws_efs_access_point.audit.id
        iam             = "ENABLED"
      }
    }
  }

  container_definitions = jsonencode([
    {
      name         = local.container_name
      image        = local.image
      essential    = true
      portMappings = [{ containerPort = 8000, protocol = "tcp" }]
      # The image's command, with the audit store on EFS: one SQLite file per task (its host name), as
      # SQLite wants a single writer per file.
      command = [
        "/bin/sh", "-c",
        "RETINAGRADE_AUDIT_PATH=\"${local.audit_dir}/$(cat /proc/sys/kernel/hostname).sqlite3\" exec retinagrade serve --workers \"$RETINAGRADE_WORKERS\"",
      ]
      environment = [
        { name = "RETINAGRADE_THREADS", value = tostring(var.onnx_threads) },
        { name = "RETINAGRADE_PREPARE_WORKERS", value = tostring(var.onnx_threads) },
      ]
      readonlyRootFilesystem = true
      mountPoints = [
        { sourceVolume = "tmp", containerPath = "/tmp", readOnly = false },
        { sourceVolume = "audit", containerPath = local.audit_dir, readOnly = false },
      ]
      secrets = [
        { name = "RETINAGRADE_API_KEYS", valueFrom = local.api_keys_secret_arn },
      ]
      healthCheck = {
        command     = ["CMD", "python3", "/opt/retinagrade/healthcheck.py"]
        interval    = 15
        timeout     = 5
        retries     = 3
        startPeriod = 60
      }
      stopTimeout = 30
      logConfiguration = {
        logDriver = "awslogs"
        options = {
          "awslogs-group"         = aws_cloudwatch_log_group.api.name
          "awslogs-region"        = var.region
          "awslogs-stream-prefix" = "api"
        }
      }
      ulimits = [{ name = "nofile", softLimit = 65536, hardLimit = 65536 }]
    }
  ])

  tags = { ModelVersion = var.model_version }
}

resource "aws_ecs_service" "api" {
  #checkov:skip=CKV_AWS_333:a public IP lets the tasks pull from ECR and write logs without a NAT gateway or VPC endpoints; inbound is load-balancer-only (the tasks' security group)
  name                               = var.name
  cluster                            = aws_ecs_cluster.main.id
  task_definition                    = aws_ecs_task_definition.api.arn
  desired_count                      = var.min_capacity
  launch_type                        = "FARGATE"
  health_check_grace_period_seconds  = 90
  enable_execute_command             = false
  propagate_tags                     = "SERVICE"
  deployment_minimum_healthy_percent = 100
  deployment_maximum_percent         = 200

  # A deployment whose tasks never become healthy is stopped and the previous one restored.
  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  network_configuration {
    subnets          = aws_subnet.public[*].id
    security_groups  = [aws_security_group.tasks.id]
    assign_public_ip = true # pulls from ECR without a NAT gateway; inbound is still ALB-only
  }

  load_balancer {
    target_group_arn = aws_lb_target_group.api.arn
    container_name   = local.container_name
    container_port   = 8000
  }

  lifecycle {
    # Autoscaling owns the count; CI (deploy.yml) registers new task definitions.
    ignore_changes = [desired_count, task_definition]
  }

  depends_on = [aws_lb_listener.https, aws_lb_listener.http, aws_efs_mount_target.audit]
}
