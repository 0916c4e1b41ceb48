"""longvita: Long-VITA long-context vision-language models in PyTorch.

import longvita
pipe = longvita.load("Long-VITA-16K_HF", device="cuda", dtype="bfloat16")
out = pipe.generate("<image>\nWhat is this?", images=["a.png"])
"""

from longvita.assets import DEMO_MODEL
from longvita.config import LongVITAConfig, VisionConfig
from longvita.errors import CheckpointError, MediaError, PromptError, ReservedTokenError
from longvita.infer.pipeline import Pipeline, load
from longvita.infer.request import GenerationOutput, GenerationRequest, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "DEMO_MODEL",
    "CheckpointError",
    "GenerationOutput",
    "GenerationRequest",
    "LongVITAConfig",
    "MediaError",
    "Pipeline",
    "PromptError",
    "ReservedTokenError",
    "SamplingParams",
    "VisionConfig",
    "load",
]
