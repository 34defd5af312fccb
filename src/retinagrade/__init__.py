"""retinagrade: diabetic retinopathy grading from fundus photographs."""

__version__ = "0.1.0"
