"""Export paths: ONNX / ONNX Runtime, TensorRT, torch.compile."""
