"""Configuration of the maskgit_fsq family (seed 004), with its presets.

Stage 1 (``tokenizer``) fields configure the FSQ autoencoder and its losses; stage 2
(``maskgit``) fields the transformer, its masking and its decoding. A stage-2 run inherits
every stage-1 field from the tokenizer export it starts from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ctray.nn.fsq import parse_levels
from ctray.optim import cosine_factor

MaskSchedule = Literal["cosine", "linear", "log2", "sqrt"]
Output = Literal["decode", "source_delta"]


@dataclass(frozen=True, kw_only=True)
class MaskGITFSQConfig:
    """Model, loss, masking and decoding settings.

    Defaults follow the FSQ paper (Mentzer et al. 2023: levels [8,5,5,5], 2^10 codes) and
    MaskGIT (Chang et al. 2022; google-research/maskgit: cosine schedule, label smoothing 0.1,
    choice temperature 4.5 annealed to 0) where they apply, the seed otherwise.

    Attributes:
        fsq_levels: FSQ levels per latent channel, as a comma-separated string (Optuna cannot
            store a list as a categorical choice); the codebook has their product of codes.
        tok_channels: tokenizer widths per level; ``len - 1`` halvings of every axis.
        tok_res_units: residual units per level.
        ssim_weight: weight of the SSIM loss beside the L1 loss (weight 1).
        adv_weight: weight of the LSGAN term from a 3D PatchDiscriminator (0: off).
        adv_warmup_epochs: epochs of L1 + SSIM before the adversarial term starts.
        disc_channels / disc_layers: PatchDiscriminator width and strided layers.
        lr_tokenizer / lr_d: Adam learning rates of the tokenizer and the discriminator.
        lr_schedule: ``cosine`` decays every learning rate of either stage per epoch to
            ``lr_floor`` times its base over the run's epochs (set from the epoch, so resumes need
            no state; the last epochs settle the weights and the batch-norm statistics);
            ``constant`` keeps it.
        hidden: transformer width (a multiple of 6 for the 3D sin-cos position code, and of
            ``heads``).
        layers / heads / mlp_ratio / dropout: MONAI TransformerBlock settings.
        schedule: mask schedule gamma(r), the share of target tokens masked at progress r:
            ``cosine`` cos(pi r / 2), ``linear`` 1 - r, ``log2`` log2(2 - r), ``sqrt``
            sqrt(1 - r) (the seed's last two); all 1 at r = 0 and 0 at r = 1.
        source_prior: initial weight of the learned logit prior towards the source's code and
            its neighbours on the FSQ grid (0: none; see ``MaskGITTransformer``).
        source_copy: initial learned logit bonus of the source's own code (0: none), so the
            untrained transformer keeps every token (the identity) and training teaches it
            where the phase changes the source.
        cond_drop: probability of training a sample without its target phase (the null phase),
            which classifier-free guidance needs.
        label_smoothing: of the masked-token cross-entropy.
        lr_transformer / weight_decay: AdamW settings of the transformer.
        sample_steps: decoding iterations T (the default of served predictions too).
        temperature: sampling temperature of the token ids (0: the most likely id; for
            translation judged against a truth the most likely tokens score best: measured on
            the phantom demo after 8 epochs, MAE 36 HU at temperature 1, 26 HU at 0).
        choice_temperature: Gumbel noise on the confidences that decide which tokens stay,
            annealed linearly to 0 over the steps.
        guidance: classifier-free guidance scale w, logits = uncond + w (cond - uncond) with
            the phase dropped in ``uncond`` (1: no guidance, one forward pass per step).
        output: ``source_delta`` = source + D(generated) - D(source tokens), so the tokenizer's
            reconstruction error cancels wherever the transformer keeps the source's tokens;
            ``decode`` = D(generated).
        seed: seeds the decoding's sampling, so predictions are repeatable.
    """

    # Stage 1: tokenizer.
    fsq_levels: str = "8,5,5,5"
    tok_channels: tuple[int, ...] = (32, 64, 128)
    tok_res_units: int = 1
    ssim_weight: float = 0.2
    adv_weight: float = 0.01
    adv_warmup_epochs: int = 5
    disc_channels: int = 32
    disc_layers: int = 2
    lr_tokenizer: float = 3e-4
    lr_d: float = 2e-4
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    lr_floor: float = 0.1
    # Stage 2: MaskGIT.
    hidden: int = 192
    layers: int = 6
    heads: int = 6
    mlp_ratio: int = 4
    dropout: float = 0.1
    schedule: MaskSchedule = "cosine"
    source_prior: float = 8.0
    source_copy: float = 2.0
    cond_drop: float = 0.1
    label_smoothing: float = 0.1
    lr_transformer: float = 3e-4
    weight_decay: float = 0.01
    sample_steps: int = 12
    temperature: float = 0.0
    choice_temperature: float = 4.5
    guidance: float = 1.0
    output: Output = "source_delta"
    seed: int = 0

    def __post_init__(self) -> None:
        parse_levels(self.fsq_levels)
        if not self.tok_channels:
            raise ValueError("tok_channels needs at least one level")
        if self.hidden % 6 or self.hidden % self.heads:
            raise ValueError(
                f"hidden={self.hidden} must be a multiple of 6 (3D sin-cos position code) and "
                f"of heads={self.heads}"
            )
        if self.source_prior < 0 or self.source_copy < 0:
            raise ValueError(
                f"source_prior and source_copy must be >= 0, got {self.source_prior} and "
                f"{self.source_copy}"
            )
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"cond_drop must be in [0, 1), got {self.cond_drop}")
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {self.sample_steps}")
        if self.temperature < 0 or self.choice_temperature < 0:
            raise ValueError("temperature and choice_temperature must be >= 0")
        if not 0.0 <= self.lr_floor <= 1.0:
            raise ValueError(f"lr_floor must be in [0, 1], got {self.lr_floor}")

    def lr_factor(self, epoch: int, num_epochs: int) -> float:
        """Multiplier of every base learning rate in ``epoch`` (0-based) of ``num_epochs``."""
        if self.lr_schedule == "constant":
            return 1.0
        return cosine_factor(epoch, num_epochs, self.lr_floor)

    @property
    def levels(self) -> tuple[int, ...]:
        return parse_levels(self.fsq_levels)

    @property
    def codebook_size(self) -> int:
        return math.prod(self.levels)

    @property
    def downsample(self) -> int:
        """How many times smaller the token grid is than the patch, per axis."""
        return 2 ** (len(self.tok_channels) - 1)


PRESETS: dict[str, dict[str, object]] = {
    # Seconds on a CPU: 16^3 patches -> 4^3 tokens, a 2-layer transformer, no warm-ups.
    "debug": {
        "fsq_levels": "8,5,5",
        "tok_channels": [8, 16, 16],
        "adv_warmup_epochs": 0,
        "disc_channels": 8,
        "disc_layers": 1,
        "lr_tokenizer": 2e-3,
        "lr_d": 1e-3,
        "hidden": 48,
        "layers": 2,
        "heads": 4,
        "mlp_ratio": 2,
        "dropout": 0.0,
        "lr_transformer": 2e-3,
        "sample_steps": 4,
    },
    # The CPU demo: 32 x 32 x 16 patches at 4 mm -> 8 x 8 x 4 = 256 tokens; the adversarial
    # term joins for the last epochs of a 4-epoch tokenizer run (early stopping waits for it).
    "demo": {
        "tok_channels": [16, 32, 64],
        "adv_warmup_epochs": 2,
        "disc_channels": 16,
        "lr_tokenizer": 2e-3,
        "lr_d": 5e-4,
        "hidden": 96,
        "layers": 3,
        "heads": 4,
        "mlp_ratio": 2,
        "dropout": 0.0,
        "lr_transformer": 2e-3,
        "sample_steps": 8,
    },
    # A100: 64^3 patches -> 16^3 = 4096 tokens.
    "a100": {
        "tok_channels": [64, 128, 256],
        "tok_res_units": 2,
        "hidden": 384,
        "layers": 12,
        "heads": 8,
    },
}
