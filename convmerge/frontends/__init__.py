"""What becomes a graph: a traced PyTorch module (torch.export, torch.fx) or an ONNX model."""
