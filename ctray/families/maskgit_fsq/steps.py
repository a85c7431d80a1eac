"""Build, train, evaluate and predict for maskgit_fsq's two stages; the generic loop calls these.

Stage ``tokenizer``: the FSQ autoencoder on every phase's volumes (the source and target columns
of a batch), L1 + ``ssim_weight`` * SSIM loss (+ ``adv_weight`` * LSGAN from a 3D
PatchDiscriminator after ``adv_warmup_epochs``). Metrics: reconstruction PSNR / SSIM / MAE,
codebook utilisation (share of the codes used in a validation batch: at most its token count
over the codebook size) and perplexity, bits per volume (tokens * log2 codebook size) and the
codebook size, which the multi-objective search minimises beside maximising PSNR.

Stage ``maskgit``: the frozen tokenizer turns source and target into token grids; the
transformer learns the masked target tokens from the rest, the source's tokens and the target
phase (masked-token cross-entropy with label smoothing). Validation decodes the whole target
from [MASK] and scores it against the simulator's aligned truth like phase_gan does (MAE, PSNR,
SSIM, organ-ROI HU errors, beside the identity baseline, per target phase), plus the share of
tokens equal to the truth's and the ``oracle`` (the truth's own tokens through the same output
path: what a perfect transformer would score with this tokenizer).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss

from ctray.data.nifti import HUWindow
from ctray.data.phases import PHASES
from ctray.metrics import image_metrics, mae_hu, psnr, split_by_group, ssim
from ctray.nn.gan import adversarial_step
from ctray.optim import set_lr
from ctray.registry import Batch, DataInfo, Models, Optimizers, StepContext

from .config import MaskGITFSQConfig
from .model import (
    FSQTokenizer,
    MaskGITTransformer,
    build_discriminator,
    check_geometry,
    decode,
    guided_logits,
    mask_tokens,
)

GAN_MODE = "lsgan"
PSNR_TOLERANCE_DB = 0.5
SSIM_WINDOW = 7


def build_models(cfg: MaskGITFSQConfig, data: DataInfo) -> Models:
    """Every module of both stages (pure construction; shapes validated against the data)."""
    grid = check_geometry(cfg, data.patch_size)
    return {
        "tokenizer": FSQTokenizer(
            levels=cfg.levels, channels=cfg.tok_channels, res_units=cfg.tok_res_units
        ),
        "discriminator": build_discriminator(cfg),
        "transformer": MaskGITTransformer(
            levels=cfg.levels,
            grid=grid,
            hidden=cfg.hidden,
            layers=cfg.layers,
            heads=cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            dropout=cfg.dropout,
            source_prior=cfg.source_prior,
            source_copy=cfg.source_copy,
        ),
    }


def build_tokenizer_optimizers(cfg: MaskGITFSQConfig, models: Models) -> Optimizers:
    return {
        "tokenizer": torch.optim.Adam(models["tokenizer"].parameters(), lr=cfg.lr_tokenizer),
        "d": torch.optim.Adam(models["discriminator"].parameters(), lr=cfg.lr_d, betas=(0.5, 0.9)),
    }


def build_maskgit_optimizers(cfg: MaskGITFSQConfig, models: Models) -> Optimizers:
    # MaskGIT's AdamW betas (0.9, 0.96).
    params = models["transformer"].parameters()
    return {
        "transformer": torch.optim.AdamW(
            params, lr=cfg.lr_transformer, betas=(0.9, 0.96), weight_decay=cfg.weight_decay
        )
    }


def _volume(batch: Batch, key: str, device: torch.device) -> torch.Tensor:
    return batch[key].to(device=device, dtype=torch.float32).unsqueeze(1)


def _bare(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


# --------------------------------------------------------------------------- stage 1


def tokenizer_warmup(cfg: MaskGITFSQConfig) -> int:
    """Epochs before the adversarial term starts: early stopping waits for it."""
    return cfg.adv_warmup_epochs if cfg.adv_weight > 0 else 0


@functools.cache
def _ssim_loss(win: int) -> SSIMLoss:
    return SSIMLoss(spatial_dims=3, data_range=1.0, win_size=win)


def ssim_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - SSIM, with a Gaussian window that fits the smallest axis (odd, <= 7)."""
    win = min(SSIM_WINDOW, *pred.shape[2:])
    return _ssim_loss(win - (1 - win % 2))(pred.float(), target.float())


def tokenizer_train_step(ctx: StepContext, batch: Batch) -> dict[str, float]:
    cfg: MaskGITFSQConfig = ctx.config
    tok, disc = ctx.models["tokenizer"], ctx.models["discriminator"]
    factor = cfg.lr_factor(ctx.epoch, ctx.num_epochs)
    set_lr([ctx.optimizers["tokenizer"]], cfg.lr_tokenizer * factor)
    set_lr([ctx.optimizers["d"]], cfg.lr_d * factor)
    x = torch.cat((_volume(batch, "source", ctx.device), _volume(batch, "target", ctx.device)))
    with ctx.autocast():
        recon, _ = tok(x)
    recon = recon.float()
    loss_l1 = F.l1_loss(recon, x)
    loss_ssim = ssim_loss(recon, x)
    loss = loss_l1 + cfg.ssim_weight * loss_ssim
    out = {"loss/l1": float(loss_l1.detach()), "loss/ssim": float(loss_ssim.detach())}
    if cfg.adv_weight > 0 and ctx.epoch >= cfg.adv_warmup_epochs:
        loss_adv, out["loss/d"] = adversarial_step(
            disc,
            x,
            recon,
            lambda d_loss: ctx.optimize(d_loss, "d"),
            mode=GAN_MODE,
            autocast=ctx.autocast,
        )
        loss = loss + cfg.adv_weight * loss_adv
        out["loss/adv"] = float(loss_adv.detach())
    ctx.optimize(loss, "tokenizer")
    out["loss/tokenizer"] = float(loss.detach())
    out["lr"] = cfg.lr_tokenizer * factor
    return out


def codebook_stats(ids: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """(share of the codebook used by ``ids``, perplexity exp(entropy) of their histogram)."""
    counts = torch.bincount(ids.flatten(), minlength=codebook_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).double().mean()), float(entropy.exp())


def _pair_mean(values: torch.Tensor) -> torch.Tensor:
    """(2B,) per-volume values of (source, truth) stacks -> (B,) per-row means."""
    first, second = values.chunk(2)
    return 0.5 * (first + second)


def tokenizer_eval_step(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    """Reconstruction of every row's source and truth volumes, and codebook statistics."""
    window = HUWindow(**ctx.data.window)
    tok: FSQTokenizer = _bare(ctx.models["tokenizer"])
    x = torch.cat((_volume(batch, "source", ctx.device), _volume(batch, "truth", ctx.device)))
    labels = batch["labels"].to(ctx.device).unsqueeze(1)
    body = torch.cat((labels, labels)) > 0
    with ctx.autocast():
        recon, ids = tok(x)
    recon = recon.float().clamp(0, 1)
    size = tok.codebook_size
    usage, perplexity = codebook_stats(ids, size)
    rows = labels.shape[0]
    tokens = ids[0].numel()

    def const(v: float) -> torch.Tensor:
        return torch.full((rows,), v, dtype=torch.float64, device=ctx.device)

    return {
        "recon_psnr": _pair_mean(psnr(recon, x)),
        "recon_ssim": _pair_mean(ssim(recon, x)),
        "recon_mae_hu": _pair_mean(mae_hu(recon, x, body, window)),
        "codebook_usage": const(usage),
        "perplexity": const(perplexity),
        "bits_per_volume": const(tokens * math.log2(size)),
        "codebook_size": const(float(size)),
    }


def tokenizer_preview(
    models: Models, batch: Batch, cfg: MaskGITFSQConfig
) -> tuple[torch.Tensor, ...]:
    tok = models["tokenizer"]
    x = _volume(batch, "truth", next(tok.parameters()).device)[:1]
    recon, _ = tok(x)
    return x[0, 0], recon.float().clamp(0, 1)[0, 0], x[0, 0]


def smallest_codebook_near_best_psnr(front: list[dict[str, float]]) -> int:
    """The smallest codebook within 0.5 dB of the best reconstruction PSNR on the front.

    Beyond the best PSNR's neighbourhood a larger codebook buys little reconstruction and
    costs the transformer a larger softmax and sparser statistics per code.
    """
    top = max(p["recon_psnr"] for p in front)
    near = [i for i, p in enumerate(front) if p["recon_psnr"] >= top - PSNR_TOLERANCE_DB]
    return min(near, key=lambda i: (front[i]["codebook_size"], -front[i]["recon_psnr"]))


# --------------------------------------------------------------------------- stage 2


def _tokens(models: Models, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _bare(models["tokenizer"]).tokenize(x)


def training_inputs(
    target: torch.Tensor,
    cfg: MaskGITFSQConfig,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(masked target ids, mask, phase-drop flags) of a batch of target ids (B, N).

    Only target ids are masked; the condition (source ids, target phase) is never masked,
    only the phase is dropped with probability ``cond_drop``.
    """
    inputs, mask = mask_tokens(target, cfg.schedule, mask_id, generator)
    drop = torch.rand(target.shape[0], generator=generator, device=target.device) < cfg.cond_drop
    return inputs, mask, drop


def maskgit_train_step(ctx: StepContext, batch: Batch) -> dict[str, float]:
    cfg: MaskGITFSQConfig = ctx.config
    net = ctx.models["transformer"]
    bare: MaskGITTransformer = _bare(net)
    lr = cfg.lr_transformer * cfg.lr_factor(ctx.epoch, ctx.num_epochs)
    set_lr(ctx.optimizers.values(), lr)
    with ctx.autocast():
        source = _tokens(ctx.models, _volume(batch, "source", ctx.device)).flatten(1)
        target = _tokens(ctx.models, _volume(batch, "target", ctx.device)).flatten(1)
    phase = batch["target_phase"].to(ctx.device).long()
    inputs, mask, drop = training_inputs(target, cfg, bare.mask_id)
    with ctx.autocast():
        logits = net(inputs, source, phase, drop)
    picked = logits[mask].float()
    loss = F.cross_entropy(picked, target[mask], label_smoothing=cfg.label_smoothing)
    ctx.optimize(loss, "transformer")
    acc = (picked.argmax(-1) == target[mask]).float().mean()
    kept = (source == target).float().mean()
    return {
        "loss/ce": float(loss.detach()),
        "masked_acc": float(acc),
        "source_equals_target": float(kept),
        "mask_share": float(mask.float().mean()),
        "lr": lr,
    }


@torch.no_grad()
def generate(
    models: Models,
    x: torch.Tensor,
    phase: torch.Tensor,
    cfg: MaskGITFSQConfig,
    *,
    steps: int,
    temperature: float,
) -> dict[str, torch.Tensor]:
    """Target-phase volumes for normalised source patches x (B, 1, *patch), both readings of
    the generated tokens (``decode``, ``source_delta``) in [0, 1], and the token grids."""
    tok: FSQTokenizer = _bare(models["tokenizer"])
    net: MaskGITTransformer = _bare(models["transformer"])
    source = tok.tokenize(x)
    flat = source.flatten(1)
    generator = torch.Generator(device=x.device).manual_seed(cfg.seed)
    ids = decode(
        lambda t: guided_logits(net, t, flat, phase, cfg.guidance),
        flat.shape[0],
        flat.shape[1],
        mask_id=net.mask_id,
        steps=steps,
        schedule=cfg.schedule,
        temperature=temperature,
        choice_temperature=cfg.choice_temperature,
        generator=generator,
        device=x.device,
    ).view_as(source)
    return {
        **readings(tok, x, source, ids),
        "tokens": ids,
        "source_tokens": source,
    }


def readings(
    tok: FSQTokenizer, x: torch.Tensor, source: torch.Tensor, ids: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``decode`` = D(ids) and ``source_delta`` = x + D(ids) - D(source), in [0, 1]."""
    decoded = tok.detokenize(ids).float()
    delta = x + decoded - tok.detokenize(source).float()
    return {"decode": decoded.clamp(0, 1), "source_delta": delta.clamp(0, 1)}


def maskgit_eval_step(ctx: StepContext, batch: Batch) -> dict[str, torch.Tensor]:
    """Model, identity and oracle metrics against the aligned truth, overall and per target
    phase (``<phase>/<metric>``, NaN for samples of other phases)."""
    cfg: MaskGITFSQConfig = ctx.config
    window = HUWindow(**ctx.data.window)
    x = _volume(batch, "source", ctx.device)
    truth = _volume(batch, "truth", ctx.device)
    labels = batch["labels"].to(ctx.device).unsqueeze(1)
    phase = batch["target_phase"].to(ctx.device).long()
    with ctx.autocast():
        out = generate(
            ctx.models, x, phase, cfg, steps=cfg.sample_steps, temperature=cfg.temperature
        )
        truth_ids = _tokens(ctx.models, truth)
        oracle = readings(_bare(ctx.models["tokenizer"]), x, out["source_tokens"], truth_ids)
    pred = out[cfg.output].float()
    metrics = image_metrics(pred, truth, labels, window)
    metrics.update(image_metrics(x, truth, labels, window, prefix="identity_"))
    metrics.update(split_by_group(metrics, phase, PHASES))
    other = "decode" if cfg.output == "source_delta" else "source_delta"
    metrics[f"mae_hu_{other}"] = mae_hu(out[other].float(), truth, labels > 0, window)
    oracle_pred = oracle[cfg.output].float()
    metrics["oracle_mae_hu"] = mae_hu(oracle_pred, truth, labels > 0, window)
    metrics["oracle_psnr"] = psnr(oracle_pred, truth)
    metrics["token_acc"] = (out["tokens"] == truth_ids).flatten(1).float().mean(1)
    metrics["source_token_acc"] = (out["source_tokens"] == truth_ids).flatten(1).float().mean(1)
    return metrics


def maskgit_preview(
    models: Models, batch: Batch, cfg: MaskGITFSQConfig
) -> tuple[torch.Tensor, ...]:
    """(source, prediction, truth) of the first sample."""
    device = next(models["tokenizer"].parameters()).device
    x = _volume(batch, "source", device)[:1]
    phase = batch["target_phase"][:1].to(device).long()
    out = generate(models, x, phase, cfg, steps=cfg.sample_steps, temperature=cfg.temperature)
    return x[0, 0], out[cfg.output][0, 0], _volume(batch, "truth", device)[0, 0]


def predict(
    models: Models, x: torch.Tensor, cfg: MaskGITFSQConfig, cond: Mapping[str, Any]
) -> torch.Tensor:
    """Normalised source patches (B, 1, *patch) -> the target phase ``cond["target_phase"]``;
    ``steps`` / ``temperature`` of None (``auto``) take the model's validated settings."""
    if x.ndim != 5 or x.shape[1] != 1:
        raise ValueError(f"maskgit_fsq predicts (B, 1, X, Y, Z) patches, got {tuple(x.shape)}")
    grid = check_geometry(cfg, tuple(x.shape[2:]))
    if grid != _bare(models["transformer"]).grid:
        raise ValueError(
            f"patches {tuple(x.shape[2:])} give a {grid} token grid; the transformer was built "
            f"for {_bare(models['transformer']).grid} (its training patch size)"
        )
    steps = cond.get("steps") or cfg.sample_steps
    temperature = cond.get("temperature")
    phase = torch.as_tensor(cond["target_phase"], device=x.device).long().expand(x.shape[0])
    out = generate(
        models,
        x.float(),
        phase,
        cfg,
        steps=int(steps),
        temperature=cfg.temperature if temperature is None else float(temperature),
    )
    return out[cfg.output]
