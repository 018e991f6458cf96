"""Plain nn.Modules of Stable Diffusion (UNet, VAE, CLIP text encoders, tokenizer), their
families and checkpoint loading. Knows nothing of sigma or sampling."""

from .families import (FAMILIES, FAMILY_NAMES, BetaSchedule, CheckpointError, ModelFamily,
                       TextEncoderSpec, detect_family, get_family, tiny_family)
from .loading import ModelParts, load_checkpoint, predicts_v, read_family, read_safetensors_header, save_checkpoint

__all__ = [
    "FAMILIES", "FAMILY_NAMES", "BetaSchedule", "CheckpointError", "ModelFamily", "TextEncoderSpec",
    "detect_family", "get_family", "tiny_family",
    "ModelParts", "load_checkpoint", "predicts_v", "read_family", "read_safetensors_header", "save_checkpoint",
]
