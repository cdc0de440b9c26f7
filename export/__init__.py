"""Export passes (ONNX, later TFLite and TVM) and parity verification."""
