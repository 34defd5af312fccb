"""The HTTP grading service: a thin FastAPI front door onto :class:`retinagrade.pipeline.GradingPipeline`."""
