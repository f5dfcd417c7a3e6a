"""ONNX models with onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from maas.runtime.base import Runtime


class OnnxRuntime(Runtime):
    def load(self) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.options.threads
        options.inter_op_num_threads = 1
        model_file = self.opened.manifest.config.get("model_file", "model.onnx")
        self._session = onnxruntime.InferenceSession(
            self._model_bytes(model_file), options, providers=["CPUExecutionProvider"]
        )
        self._output_names = [spec.name for spec in self.outputs]

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._session.run(self._output_names, inputs)
        return dict(zip(self._output_names, results, strict=True))

    def unload(self) -> None:
        self._session = None

    def _model_bytes(self, model_file: str) -> bytes:
        """The model with its external data inlined, decrypted in memory when encrypted."""
        model = onnx.load_model_from_string(self.opened.read_bytes(model_file))
        files: dict[str, bytes] = {}
        base = model_file.rpartition("/")[0]
        for tensor in _external_tensors(model.graph):
            where = {entry.key: entry.value for entry in tensor.external_data}
            relpath = f"{base}/{where['location']}" if base else where["location"]
            if relpath not in files:
                files[relpath] = self.opened.read_bytes(relpath)
            offset = int(where.get("offset", 0))
            length = int(where.get("length", len(files[relpath]) - offset))
            tensor.raw_data = files[relpath][offset : offset + length]
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]
        return model.SerializeToString()


def _external_tensors(graph: onnx.GraphProto):
    from maas.registry.formats.onnx_file import tensors_of

    return [t for t in tensors_of(graph) if t.data_location == TensorProto.EXTERNAL]
