"""onnxruntime session over an exported folder (needs no torch model)."""
