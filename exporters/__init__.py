"""Everything about exported artifacts: ONNX export, the onnxruntime runtime, verification."""
