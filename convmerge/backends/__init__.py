"""What a plan becomes: the fused PyTorch module (and its end-to-end check), a loaded module, ONNX."""
