"""Stateful chunk-step ONNX export."""
