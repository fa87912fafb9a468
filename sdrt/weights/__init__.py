"""Weights of an exported model changed at load time without re-exporting: LoRAs and explicit overrides.

numpy only (no torch, no onnx): ``onnx_file`` locates initializers in ONNX files, ``weight_map`` reads the map
the exporter writes from torch parameter names to those initializers, ``lora`` reads kohya/A1111 LoRA files,
``overrides`` merges all of it per component for the pipeline.
"""
