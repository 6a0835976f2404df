"""Exporters: a trained tilec model to other formats (ONNX, for inference)."""
