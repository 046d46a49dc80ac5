"""Checkpoint -> validated ONNX artifact (``export``), and TensorRT engines from artifacts (``tensorrt.build``)."""

from kiln.exporter.export import DEFAULT_OPSET, ExportOptions, export

__all__ = ["DEFAULT_OPSET", "ExportOptions", "export"]
