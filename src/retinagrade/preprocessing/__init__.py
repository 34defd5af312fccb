"""Image preprocessing shared by training, evaluation, the CLI and the service."""
