"""What is made from models: predictions, the HTML report, ONNX export."""
