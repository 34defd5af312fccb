"""One ONNX Runtime session for the grading network, checked against its spec when it is created."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retinagrade.cpus import available_cpus
from retinagrade.errors import ModelError
from retinagrade.inference.model_spec import OUTPUT_NAMES, ModelSpec


@dataclass(frozen=True)
class ModelOutputs:
    """Raw outputs for a batch: logits N x 5, regression N, cam N x 6 x h x w, embedding N x C."""

    logits: np.ndarray
    regression: np.ndarray
    cam: np.ndarray
    embedding: np.ndarray
    #: N logits of diabetic macular oedema, for a model with a DME output; else None.
    dme: np.ndarray | None = None


class OnnxGrader:
    """Runs the exported network. Thread-safe: ONNX Runtime sessions may be shared across threads."""

    def __init__(self, spec: ModelSpec, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.spec = spec
        #: ONNX Runtime's intra-op threads (1: the session starts no thread of its own).
        self.threads = threads or min(4, available_cpus())
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # ONNX Runtime's idle intra-op threads spin by default, burning the cores that the threads decoding and
        # preparing the next images need: measured in the service, 20-40 ms of CPU per image (the same answers).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(spec.model_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises its own untyped errors for a bad file
            raise ModelError(f"ONNX Runtime cannot load {spec.model_path.name}: {type(exc).__name__}") from exc
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        size = spec.preprocess.input_size
        if len(inputs) != 1 or list(inputs[0].shape[1:]) != [3, size, size]:
            raise ModelError(f"model input {inputs[0].shape} does not match the spec's 3 x {size} x {size}")
        # The spec declares the outputs (training wrote it); a spec that lacks a role this grader reads is refused.
        absent_roles = [name for name in OUTPUT_NAMES if name not in spec.outputs]
        if absent_roles:
            raise ModelError(f"model spec declares no outputs {absent_roles}")
        missing = [name for name in spec.outputs if name not in outputs]
        if missing:
            raise ModelError(f"model lacks outputs {missing}")
        if spec.dme is not None and "dme" not in spec.outputs:
            raise ModelError("model spec has a DME rule but declares no dme output")
        self._input_name = inputs[0].name

    def run(self, batch: np.ndarray) -> ModelOutputs:
        """Run a N x 3 x S x S float32 batch."""
        names = list(self.spec.outputs)
        values = dict(zip(names, self.session.run(names, {self._input_name: batch}), strict=True))
        return ModelOutputs(
            logits=values["logits"],
            regression=values["regression"].reshape(-1),
            cam=values["cam"],
            embedding=values["embedding"],
            dme=values["dme"].reshape(-1) if "dme" in values else None,
        )
