"""Stage 3, ship: the student as an ONNX file checked against PyTorch, its int8 copy, and depth
maps for photos from either."""
