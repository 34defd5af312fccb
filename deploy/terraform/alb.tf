locals {
  https = var.certificate_arn != ""
  # Terraform 1.0 has no cross-variable validation: stop the plan with this message instead.
  plain_http = local.https ? false : (var.allow_plain_http ? true : tobool(
    "certificate_arn is required (HTTPS listener); set allow_plain_http = true only for a test stack"
  ))
}

resource "aws_lb" "api" {
  #checkov:skip=CKV2_AWS_20:no HTTP listener to redirect by default (a client POSTing an image to http:// would send it in the clear before any redirect); the plain one exists only with allow_plain_http = true
  #checkov:skip=CKV2_AWS_28:WAF is an account-level choice (a web ACL to associate with this ALB); the service authenticates every call with an API key and limits request sizes itself
  name                       = var.name
  load_balancer_type         = "application"
  internal                   = false
  security_groups            = [aws_security_group.alb.id]
  subnets                    = aws_subnet.public[*].id
  idle_timeout               = 120
  drop_invalid_header_fields = true
  enable_deletion_protection = var.deletion_protection

  access_logs {
    bucket  = aws_s3_bucket.logs.id
    prefix  = "alb"
    enabled = true
  }

  depends_on = [aws_s3_bucket_policy.logs]
}

resource "aws_lb_target_group" "api" {
  #checkov:skip=CKV_AWS_378:TLS ends at the load balancer; load balancer to task traffic stays inside the VPC on port 8000, allowed only from the load balancer's security group
  name                 = var.name
  port                 = 8000
  protocol             = "HTTP"
  target_type          = "ip"
  vpc_id               = aws_vpc.main.id
  deregistration_delay = 30

  health_check {
    path                = "/health/ready"
    matcher             = "200"
    interval            = 15
    timeout             = 5
    healthy_threshold   = 2
    unhealthy_threshold = 3
  }
}

# HTTPS only by default. No port-80 redirect either: a client that POSTs an image to http:// would send it
# in the clear before it ever saw the redirect.
resource "aws_lb_listener" "https" {
  count             = local.https ? 1 : 0
  load_balancer_arn = aws_lb.api.arn
  port              = 443
  protocol          = "HTTPS"
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"
  certificate_arn   = var.certificate_arn
  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.api.arn
  }
}

# Plain HTTP: only with allow_plain_http = true and no certificate (an explicit opt-in for a test stack).
resource "aws_lb_listener" "http" {
  #checkov:skip=CKV_AWS_2:exists only with allow_plain_http = true (explicit opt-in for a test stack); the default is the HTTPS listener alone
  #checkov:skip=CKV_AWS_103:same opt-in plain-HTTP listener; the HTTPS listener uses ELBSecurityPolicy-TLS13-1-2-2021-06
  count             = local.plain_http ? 1 : 0
  load_balancer_arn = aws_lb.api.arn
  port              = 80
  protocol          = "HTTP"
  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.api.arn
  }
}
