"""Networks and MaskGIT procedures of maskgit_fsq: FSQ tokenizer, bidirectional transformer,
mask schedules, training masks and iterative parallel decoding.

Tokenizer: MONAI convolutions and residual units around an FSQ bottleneck (``ctray.nn.fsq``).
It has no normalisation layers, so a token depends only on its receptive field, never on the
statistics of the rest of the patch: the same anatomy gives the same tokens in the source and
the target phase and in overlapping inference windows.

Transformer: MONAI ``TransformerBlock`` (bidirectional) over the target's token grid, with a
fixed 3D sin-cos position code (MONAI ``build_sincos_position_embedding``). The condition is
added to every position: the source's token at the same position (the phases are aligned
voxel by voxel) and the target phase's sinusoidal code, or a learned null phase when dropped
(classifier-free guidance). Token ids enter through their FSQ codes (a linear map of the
per-channel levels keeps the codebook's grid structure); the [MASK] id is ``codebook_size``,
an id of its own (the seed's -100 is cross-entropy's ignore index), with a learned embedding.

MaskGIT (Chang et al., CVPR 2022; google-research/maskgit ``libml/mask_schedule.py``): training
masks ``ceil(gamma(r) N)`` random target tokens with ``r ~ U[0, 1)``; decoding starts from all
[MASK] and, at step t of T, samples every masked token, keeps the most confident ones and
re-masks ``floor(gamma((t + 1) / T) N)`` (at least one fewer each step, none after the last).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit, TransformerBlock
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
from monai.networks.nets import PatchDiscriminator
from torch import nn

from ctray.nn.embedding import SinusoidalEmbedding
from ctray.nn.fsq import FSQ

from .config import MaskGITFSQConfig, MaskSchedule

ACT = "PRELU"
NORM = "BATCH"


def mask_ratio(schedule: MaskSchedule, r: torch.Tensor) -> torch.Tensor:
    """gamma(r): the share of tokens masked at progress r in [0, 1]; 1 at 0, 0 at 1."""
    r = r.clamp(0.0, 1.0)
    if schedule == "cosine":
        out = torch.cos(0.5 * math.pi * r)
    elif schedule == "linear":
        out = 1.0 - r
    elif schedule == "log2":
        out = torch.log2(2.0 - r)
    elif schedule == "sqrt":
        out = torch.sqrt(1.0 - r)
    else:
        raise ValueError(f"unknown mask schedule {schedule!r}; valid: cosine, linear, log2, sqrt")
    return out.clamp(0.0, 1.0)


def mask_tokens(
    ids: torch.Tensor,
    schedule: MaskSchedule,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training inputs: (ids with ``ceil(gamma(r) N)`` random positions set to ``mask_id``
    per sample, r ~ U[0, 1); the boolean mask). At least one token is masked."""
    batch, n = ids.shape
    r = torch.rand(batch, generator=generator, device=ids.device)
    count = torch.ceil(mask_ratio(schedule, r) * n).long().clamp(1, n)
    noise = torch.rand(batch, n, generator=generator, device=ids.device)
    mask = noise.argsort(dim=1).argsort(dim=1) < count[:, None]
    return ids.masked_fill(mask, mask_id), mask


@torch.no_grad()
def decode(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    batch: int,
    tokens: int,
    *,
    mask_id: int,
    steps: int,
    schedule: MaskSchedule,
    temperature: float,
    choice_temperature: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Iterative parallel decoding: (batch, tokens) ids with no [MASK] left after ``steps``.

    ``logits_fn(ids)`` gives (batch, tokens, codebook) logits for the current ids. Masked
    tokens are sampled at ``temperature`` (0: argmax); their confidence is the log-probability
    of the sampled id plus Gumbel noise scaled by ``choice_temperature * (1 - r)``; decided
    tokens are never re-masked.
    """
    ids = torch.full((batch, tokens), mask_id, dtype=torch.long, device=device)
    for t in range(steps):
        logits = logits_fn(ids).float()
        unknown = ids == mask_id
        logp = F.log_softmax(logits, dim=-1)
        if temperature > 0:
            probs = F.softmax(logits / temperature, dim=-1).flatten(0, 1)
            sampled = torch.multinomial(probs, 1, generator=generator).view(batch, tokens)
        else:
            sampled = logits.argmax(dim=-1)
        confidence = logp.gather(-1, sampled[..., None])[..., 0]
        r = (t + 1) / steps
        if choice_temperature > 0 and r < 1:
            u = torch.rand(confidence.shape, generator=generator, device=confidence.device)
            gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0)).clamp_min(1e-20))
            confidence = confidence + choice_temperature * (1 - r) * gumbel
        confidence = confidence.masked_fill(~unknown, math.inf)
        ids = torch.where(unknown, sampled, ids)
        still = math.floor(float(mask_ratio(schedule, torch.tensor(r))) * tokens)
        keep_masked = (unknown.sum(dim=1) - 1).clamp(min=0).clamp(max=still)
        remask = confidence.argsort(dim=1).argsort(dim=1) < keep_masked[:, None]
        ids = ids.masked_fill(remask, mask_id)
    return ids


class FSQTokenizer(nn.Module):
    """3D convolutional autoencoder whose bottleneck is FSQ: volumes <-> token grids.

    Args:
        levels: FSQ levels per latent channel.
        channels: widths per level; ``len - 1`` stride-2 halvings of every axis.
        res_units: MONAI residual units per level.
    """

    def __init__(self, *, levels: Sequence[int], channels: Sequence[int], res_units: int):
        super().__init__()
        self.fsq = FSQ(levels)
        ch = list(channels)
        enc: list[nn.Module] = [Convolution(3, 1, ch[0], kernel_size=3, act=ACT, norm=NORM)]
        for i, c in enumerate(ch):
            enc += [ResidualUnit(3, c, c, act=ACT, norm=NORM) for _ in range(res_units)]
            if i + 1 < len(ch):
                enc.append(Convolution(3, c, ch[i + 1], strides=2, act=ACT, norm=NORM))
        enc.append(Convolution(3, ch[-1], self.fsq.dim, kernel_size=1, conv_only=True))
        dec: list[nn.Module] = [Convolution(3, self.fsq.dim, ch[-1], act=ACT, norm=NORM)]
        for i in reversed(range(len(ch))):
            dec += [ResidualUnit(3, ch[i], ch[i], act=ACT, norm=NORM) for _ in range(res_units)]
            if i > 0:
                dec.append(nn.Upsample(scale_factor=2, mode="trilinear", align_corners=False))
                dec.append(Convolution(3, ch[i], ch[i - 1], act=ACT, norm=NORM))
        dec.append(Convolution(3, ch[0], 1, kernel_size=1, conv_only=True))
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    @property
    def codebook_size(self) -> int:
        return self.fsq.codebook_size

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, token ids (B, *grid)); gradients pass the rounding straight."""
        codes, ids = self.fsq(self.encoder(x))
        return self.decoder(codes), ids

    def tokenize(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids (B, *grid) of volumes (B, 1, *patch)."""
        return self.fsq(self.encoder(x))[1]

    def detokenize(self, ids: torch.Tensor) -> torch.Tensor:
        """Volumes (B, 1, *patch) of token ids (B, *grid)."""
        return self.decoder(self.fsq.indices_to_codes(ids))


def build_discriminator(cfg: MaskGITFSQConfig) -> PatchDiscriminator:
    return PatchDiscriminator(
        spatial_dims=3,
        num_layers_d=cfg.disc_layers,
        channels=cfg.disc_channels,
        in_channels=1,
        out_channels=1,
        norm="INSTANCE",
    )


class MaskGITTransformer(nn.Module):
    """Bidirectional transformer: (target ids with [MASK], source ids, target phase) -> logits.

    Args:
        levels: the tokenizer's FSQ levels (ids are read through their codes).
        grid: the token grid (X, Y, Z) of a patch.
        hidden / layers / heads / mlp_ratio / dropout: transformer settings.
        source_prior: initial weight a of the learned prior ``-a |code - source code|^2`` on
            the logits (0: none): the target phase keeps most of the source's tokens, or
            moves them to nearby codes on the FSQ grid, so decoding starts from "keep the
            source" and learns where the phase changes it (a copy mechanism in the spirit of
            pointer-generator networks).
        source_copy: initial value of a learned bonus on the logit of the source's own code
            (0: none). The distance prior alone barely separates the source's code from its
            neighbours (adjacent levels are ~0.08 apart squared), so an untrained model would
            pick among them at random; with the bonus it starts as the identity (every token
            kept) and learns where the target phase changes the source, and out of its training
            distribution it keeps the source rather than guessing.
    """

    def __init__(
        self,
        *,
        levels: Sequence[int],
        grid: Sequence[int],
        hidden: int,
        layers: int,
        heads: int,
        mlp_ratio: int,
        dropout: float,
        source_prior: float,
        source_copy: float = 0.0,
    ):
        super().__init__()
        self.fsq = FSQ(levels)
        self.grid = tuple(int(g) for g in grid)
        self.target_in = nn.Linear(self.fsq.dim, hidden)
        self.source_in = nn.Linear(self.fsq.dim, hidden)
        self.mask_embed = nn.Parameter(0.02 * torch.randn(hidden))
        self.phase_code = nn.Sequential(
            SinusoidalEmbedding(hidden),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
        )
        self.null_phase = nn.Parameter(0.02 * torch.randn(hidden))
        with warnings.catch_warnings():  # MONAI calls torch.meshgrid without indexing=
            warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
            pos = build_sincos_position_embedding(list(self.grid), hidden, spatial_dims=3)
        self.register_buffer("pos", pos.detach().clone(), persistent=False)
        self.blocks = nn.ModuleList(
            TransformerBlock(hidden, hidden * mlp_ratio, heads, dropout, qkv_bias=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, self.fsq.codebook_size)
        codebook = self.fsq.indices_to_codes(torch.arange(self.fsq.codebook_size))
        self.register_buffer("codebook", codebook, persistent=False)
        # Registered only when used: DDP refuses parameters that never get a gradient.
        prior = nn.Parameter(torch.tensor(math.log(source_prior))) if source_prior > 0 else None
        self.register_parameter("log_prior", prior)
        copy = nn.Parameter(torch.tensor(float(source_copy))) if source_copy > 0 else None
        self.register_parameter("copy_bonus", copy)

    @property
    def mask_id(self) -> int:
        return self.fsq.codebook_size

    def _codes(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fsq.indices_to_codes(ids).transpose(1, 2)

    def forward(
        self,
        tokens: torch.Tensor,
        source: torch.Tensor,
        phase: torch.Tensor,
        drop_phase: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, N, codebook_size) for target ids ``tokens`` (B, N) that may hold [MASK],
        the source's ids (B, N) and the target phase (B,); ``drop_phase`` (B,) bool swaps the
        phase for the null phase."""
        masked = tokens == self.mask_id
        h = self.target_in(self._codes(tokens.masked_fill(masked, 0)))
        h = torch.where(masked[..., None], self.mask_embed.to(h.dtype), h)
        cond = self.phase_code(phase)
        if drop_phase is not None:
            cond = torch.where(drop_phase[:, None], self.null_phase.to(cond.dtype), cond)
        h = h + self.source_in(self._codes(source)) + cond[:, None, :] + self.pos
        for block in self.blocks:
            h = block(h)
        logits = self.head(self.norm(h))
        if self.log_prior is not None:
            logits = logits - self.log_prior.exp() * self.code_distance(source).to(logits.dtype)
        if self.copy_bonus is not None:
            bonus = self.copy_bonus.to(logits.dtype).expand(*source.shape, 1)
            logits = logits.scatter_add(-1, source[..., None], bonus)
        return logits

    def code_distance(self, source: torch.Tensor) -> torch.Tensor:
        """Squared distance (B, N, codebook_size) of every code to the source's code."""
        src = self._codes(source).float()
        book = self.codebook.float()
        cross = src @ book.T
        return (src.pow(2).sum(-1, keepdim=True) - 2 * cross + book.pow(2).sum(-1)).clamp_min(0)


def guided_logits(
    transformer: MaskGITTransformer,
    tokens: torch.Tensor,
    source: torch.Tensor,
    phase: torch.Tensor,
    guidance: float,
) -> torch.Tensor:
    """Classifier-free guidance on the target phase: uncond + w (cond - uncond); the source
    is in both passes (guidance amplifies what the phase changes, not the anatomy)."""
    if guidance == 1.0:
        return transformer(tokens, source, phase)
    batch = tokens.shape[0]
    drop = torch.arange(2 * batch, device=tokens.device) >= batch
    both = transformer(
        torch.cat((tokens, tokens)), torch.cat((source, source)), torch.cat((phase, phase)), drop
    ).float()
    cond, uncond = both.chunk(2)
    return uncond + guidance * (cond - uncond)


def check_geometry(cfg: MaskGITFSQConfig, patch: Sequence[int]) -> tuple[int, int, int]:
    """Validate that the networks fit the patch; returns the token grid.

    Raises:
        ValueError: naming what to change (patch, widths or discriminator depth).
    """
    if len(patch) != 3:
        raise ValueError(f"maskgit_fsq needs 3D patches (X, Y, Z), got {tuple(patch)}")
    down = cfg.downsample
    if any(p % down for p in patch):
        raise ValueError(
            f"the patch {tuple(patch)} is not divisible by {down} on every axis, as a tokenizer "
            f"with {len(cfg.tok_channels)} levels needs; pick multiples of {down} or use fewer "
            "tok_channels levels"
        )
    if cfg.adv_weight > 0 and min(patch) // 2**cfg.disc_layers < 3:
        raise ValueError(
            f"a PatchDiscriminator with {cfg.disc_layers} strided layers needs every patch axis "
            f">= {3 * 2**cfg.disc_layers} voxels, the smallest is {min(patch)}; lower "
            "disc_layers, use a larger patch, or set adv_weight=0"
        )
    return tuple(p // down for p in patch)  # type: ignore[return-value]
