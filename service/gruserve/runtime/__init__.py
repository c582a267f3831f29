"""onnxruntime side of serving: providers, loaded models, the model registry, batchers."""
