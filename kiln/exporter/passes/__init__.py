"""Graph passes over exported ONNX models, one per file: match a known node, build its replacement, commit."""
