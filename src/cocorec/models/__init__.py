"""CTR backbones (DIN, DIEN, DCNv2, DeepFM, AutoInt, xDeepFM), all accepting knowledge fields."""

from cocorec.models.base import MODELS, BaseModel, Inputs, build_model, mlp, random_batch

# Importing the modules registers the backbones.
from cocorec.models import autoint, dcnv2, deepfm, dien, din, xdeepfm  # noqa: E402,F401

__all__ = ["MODELS", "BaseModel", "Inputs", "build_model", "mlp", "random_batch"]
