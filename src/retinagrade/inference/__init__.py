"""Model spec, ONNX Runtime session and post-processing: everything between a tensor and a grade."""
