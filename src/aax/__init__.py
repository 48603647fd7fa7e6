"""AAX: pixel-level annotations from image-level labels, with uncertainty and review flags."""

__version__ = "0.1.0"
