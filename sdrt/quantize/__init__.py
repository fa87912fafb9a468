"""Quantization: int8 OpenVINO builds with NNCF (:mod:`.openvino`), calibrated on UNet inputs captured from
sdrt's own pipeline (:mod:`.calibration`). Imported only by a build that asks for int8."""
