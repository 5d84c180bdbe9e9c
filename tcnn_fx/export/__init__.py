"""Deployment: ONNX export of rewritten models and its verification against ONNX Runtime."""

from tcnn_fx.export.onnx import ExportError, OnnxCheck, to_onnx, verify_onnx

__all__ = ["ExportError", "OnnxCheck", "to_onnx", "verify_onnx"]
