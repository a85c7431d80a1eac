"""xray2ct: a CT volume from two (or N) X-ray views, hybrid CNN-ViT + Swin decoder (seed 003)."""
