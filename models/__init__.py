"""Networks, PNI layers, the smoothed classifier and the checkpoint format (shared by training and serving)."""

from models.checkpoint import CheckpointError, Manifest, load_checkpoint, read_manifest, save_checkpoint
from models.resnet import Classifier, build_classifier
from models.smooth import ABSTAIN, Certificate, Prediction, Smooth
from models.spec import ArchitectureSpec, ModelSpec, NoiseLayerSpec, NormalizationSpec, SmoothingSpec

__all__ = [
    "ABSTAIN", "ArchitectureSpec", "Certificate", "CheckpointError", "Classifier", "Manifest", "ModelSpec",
    "NoiseLayerSpec", "NormalizationSpec", "Prediction", "Smooth", "SmoothingSpec", "build_classifier",
    "load_checkpoint", "read_manifest", "save_checkpoint",
]
