"""sdrt: Stable Diffusion exported to ONNX and run on ONNX Runtime, OpenVINO or TensorRT, without torch."""
from .loader import load
from .pipelines.control import Control
from .pipelines.pipeline import Result, StableDiffusion
from .runtimes import BuildOptions, build

__version__ = "0.1.0"
__all__ = ["load", "build", "BuildOptions", "Control", "Result", "StableDiffusion", "__version__"]
