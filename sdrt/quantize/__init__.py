"""Quantization: int8 OpenVINO builds with NNCF (:mod:`.openvino`) and int8 ONNX Runtime builds with static
QDQ quantization (:mod:`.onnxruntime`), both calibrated on UNet inputs captured from sdrt's own pipeline
(:mod:`.calibration`) and judged against fp32 (:mod:`.quality`). Imported only by a build that asks for int8."""
