"""The one generic training loop and its TorchTrainer factory."""
