terraform {
  required_version = ">= 1.0.0"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0, < 6.0"
    }
  }
  # State: configure a remote backend per account, e.g. in backend.tf (not committed):
  #   terraform { backend "s3" { bucket = "...", key = "retinagrade/terraform.tfstate", region = "...",
  #                              dynamodb_table = "...", encrypt = true } }
}

provider "aws" {
  region = var.region
  default_tags {
    tags = merge({ Project = "retinagrade", ManagedBy = "terraform" }, var.tags)
  }
}
