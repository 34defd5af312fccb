"""Watching a deployment: drift of what the service sees against a reference."""
