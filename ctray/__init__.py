"""ctray: distributed training, tuning and serving of 3D CT image-to-image generative models."""

__version__ = "0.1.0"
