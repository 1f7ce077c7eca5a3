"""Exporters of KVzap surrogates to per-layer deployable artifacts: ONNX files (`exporters.onnx`) and TensorRT
engines (`exporters.trt`), each directory described by a `manifest.json` (`exporters.manifest`)."""
