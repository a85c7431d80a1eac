"""maskgit_fsq: FSQ, mask schedules, training masks, decoding, Pareto selection, both stages."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ctray.config import ConfigError, from_dict
from ctray.data.build import BuildConfig
from ctray.data.shards import column_numpy, read_split
from ctray.families.maskgit_fsq.config import MaskGITFSQConfig
from ctray.families.maskgit_fsq.model import check_geometry, decode, mask_ratio, mask_tokens
from ctray.families.maskgit_fsq.spec import SPEC, parse_steps, parse_temperature
from ctray.families.maskgit_fsq.steps import smallest_codebook_near_best_psnr, training_inputs
from ctray.nn.fsq import FSQ, parse_levels, round_ste
from ctray.registry import DataInfo, Stage, get_family
from ctray.train.local import local_context
from ctray.tune.pareto import choose, pareto_front
from ctray.tune.search_space import load_search_space, parse_search_space

SCHEDULES = ("cosine", "linear", "log2", "sqrt")
PAPER_LEVELS = ("8,6,5", "8,5,5,5", "7,5,5,5,5", "8,8,8,6,5", "8,8,8")
BUILD = BuildConfig(patch_size=(16, 16, 16), spacing=(8.0, 8.0, 8.0), patches_per_subject=2)


def _cfg(**over) -> MaskGITFSQConfig:
    return from_dict(MaskGITFSQConfig, {**SPEC.preset("debug"), **over})


# --------------------------------------------------------------------------- FSQ


@pytest.mark.parametrize("text", [*PAPER_LEVELS, "2,3,4"])
def test_fsq_values_lie_on_the_level_grid_with_every_level_reached(text: str) -> None:
    fsq = FSQ(parse_levels(text))
    z = 5.0 * torch.randn(4000, fsq.dim, 2, generator=torch.Generator().manual_seed(0))
    codes, ids = fsq(z)
    half = torch.tensor([n // 2 for n in fsq.levels], dtype=torch.float32).view(1, -1, 1)
    integers = codes * half
    torch.testing.assert_close(integers, integers.round())  # on the integer grid
    for channel, n in enumerate(fsq.levels):
        values = integers[:, channel].round().unique()
        assert len(values) == n, (text, channel, values)  # exactly L values, odd or even
        assert float(values.min()) == -(n // 2) and float(values.max()) == (n - 1) // 2
    assert codes.abs().max() <= 1.0
    assert fsq.codebook_size == math.prod(fsq.levels)
    assert ids.min() >= 0 and ids.max() < fsq.codebook_size


@pytest.mark.parametrize("text", PAPER_LEVELS)
def test_fsq_index_and_code_are_a_bijection_over_the_whole_codebook(text: str) -> None:
    fsq = FSQ(parse_levels(text))
    ids = torch.arange(fsq.codebook_size)
    codes = fsq.indices_to_codes(ids)
    assert codes.shape == (fsq.codebook_size, fsq.dim)
    assert torch.unique(codes, dim=0).shape[0] == fsq.codebook_size
    assert torch.equal(fsq.codes_to_indices(codes), ids)
    # quantising a code gives it back (a code is a fixed point of bound + round)
    z = (
        torch.atanh(((codes * fsq.half_width + fsq.offset) / fsq.half_range).clamp(-0.999, 0.999))
        - fsq.shift
    )
    again, again_ids = fsq(z)
    torch.testing.assert_close(again, codes)
    assert torch.equal(again_ids, ids)


def test_straight_through_rounding_has_an_identity_gradient() -> None:
    x = torch.linspace(-3.0, 3.0, 61, requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), x.detach().round())
    (y * torch.arange(61.0)).sum().backward()
    torch.testing.assert_close(x.grad, torch.arange(61.0))
    fsq = FSQ((8, 5, 5, 5))  # gradients reach the latents through the bound
    z = torch.randn(2, 4, 3, requires_grad=True)
    fsq(z)[0].sum().backward()
    assert z.grad is not None and bool((z.grad > 0).all())


def test_fsq_quantises_in_float32_under_bf16_autocast() -> None:
    fsq = FSQ((8, 8, 8, 6, 5))
    z = 3.0 * torch.randn(64, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes, ids = fsq(torch.nn.Linear(8, 8)(z))
    assert codes.dtype == torch.float32
    assert ids.min() >= 0 and ids.max() < fsq.codebook_size


def test_levels_are_strings_in_configs_and_bad_ones_are_refused() -> None:
    assert parse_levels("8, 5,5,5") == (8, 5, 5, 5)
    assert MaskGITFSQConfig(fsq_levels="8,6,5").codebook_size == 240
    for bad in ("", "8,x", "8,1", "[8, 5]"):
        with pytest.raises(ValueError, match="FSQ"):
            parse_levels(bad)
    with pytest.raises(ValueError, match="FSQ levels must be integers"):
        from_dict(MaskGITFSQConfig, {"fsq_levels": "8,x"})
    with pytest.raises(ValueError, match="multiple of 6"):
        MaskGITFSQConfig(hidden=64, heads=4)


# --------------------------------------------------------------------------- MaskGIT


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mask_schedules_are_monotone_from_one_to_zero(schedule: str) -> None:
    r = torch.linspace(0.0, 1.0, 101)
    gamma = mask_ratio(schedule, r)
    assert float(gamma[0]) == pytest.approx(1.0) and float(gamma[-1]) == pytest.approx(0.0)
    assert bool((gamma[1:] <= gamma[:-1]).all()), "the masked share must never grow"
    assert bool((gamma[1:-1] < 1).all() and (gamma[1:-1] > 0).all())
    with pytest.raises(ValueError, match="valid: cosine"):
        mask_ratio("exp", r)


def test_training_masks_touch_target_tokens_only() -> None:
    cfg = _cfg(cond_drop=0.5)
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 200, (64, 27), generator=gen)
    inputs, mask, drop = training_inputs(target, cfg, mask_id=200, generator=gen)
    assert torch.equal(inputs == 200, mask)
    assert torch.equal(inputs[~mask], target[~mask])
    assert bool((mask.sum(1) >= 1).all())
    assert 0 < int(drop.sum()) < 64  # the phase is dropped for some samples only
    shares = mask.float().mean(1)
    assert float(shares.min()) < 0.5 < float(shares.max())  # ratios drawn from the schedule
    # the same masks, shown a fixed ratio distribution: cosine masks more than linear on average
    cos = mask_tokens(target, "cosine", 200, torch.Generator().manual_seed(1))[1].float().mean()
    lin = mask_tokens(target, "linear", 200, torch.Generator().manual_seed(1))[1].float().mean()
    assert float(cos) > float(lin)


class _Spy(nn.Module):
    """Records the transformer's inputs; ``module`` makes the steps unwrap it like DDP."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.calls: list[tuple[torch.Tensor, ...]] = []

    def forward(self, tokens, source, phase, drop=None):
        self.calls.append((tokens.clone(), source.clone(), phase.clone()))
        return self.module(tokens, source, phase, drop)


def test_masking_in_the_train_step_never_touches_condition_tokens(shards) -> None:
    data, batch = shards
    cfg = _cfg()
    torch.manual_seed(0)
    ctx = local_context(SPEC, cfg, data, stage="maskgit")
    spy = _Spy(ctx.models["transformer"])
    ctx.models["transformer"] = spy
    SPEC.stage("maskgit").train_step(ctx, batch)
    (tokens, source, phase) = spy.calls[0]
    tok = ctx.models["tokenizer"]
    with torch.no_grad():
        want_source = tok.tokenize(batch["source"][:, None].float()).flatten(1)
        want_target = tok.tokenize(batch["target"][:, None].float()).flatten(1)
    mask_id = spy.module.mask_id
    assert mask_id == tok.codebook_size  # a dedicated id, not -100
    assert torch.equal(source, want_source) and not bool((source == mask_id).any())
    assert torch.equal(phase, batch["target_phase"].long())
    masked = tokens == mask_id
    assert bool(masked.any()) and torch.equal(tokens[~masked], want_target[~masked])


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_decoding_unmasks_every_token_in_t_steps(schedule: str, steps: int) -> None:
    batch, tokens, size = 3, 40, 17
    seen: list[int] = []
    gen = torch.Generator().manual_seed(0)

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        seen.append(int((ids == size).sum()))
        return torch.randn(ids.shape[0], ids.shape[1], size, generator=gen)

    ids = decode(
        logits_fn,
        batch,
        tokens,
        mask_id=size,
        steps=steps,
        schedule=schedule,
        temperature=1.0,
        choice_temperature=4.5,
        generator=torch.Generator().manual_seed(1),
    )
    assert len(seen) == steps and seen[0] == batch * tokens
    assert all(a > b for a, b in itertools.pairwise(seen)), seen  # fewer every step
    assert not bool((ids == size).any()) and int(ids.min()) >= 0 and int(ids.max()) < size


def test_greedy_decoding_keeps_decided_tokens_and_is_repeatable() -> None:
    size, tokens = 11, 30
    table = torch.randn(tokens, size, generator=torch.Generator().manual_seed(0))
    history: list[torch.Tensor] = []

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        history.append(ids.clone())
        return table.expand(ids.shape[0], -1, -1)

    args = {"mask_id": size, "steps": 5, "schedule": "cosine", "temperature": 0.0}
    first = decode(logits_fn, 2, tokens, choice_temperature=0.0, **args)
    torch.testing.assert_close(first, table.argmax(-1).expand(2, -1))
    for before, after in itertools.pairwise(history):
        decided = before != size
        assert torch.equal(after[decided], before[decided])  # never re-masked
    again = decode(logits_fn, 2, tokens, choice_temperature=0.0, **args)
    assert torch.equal(first, again)


# --------------------------------------------------------------------------- Pareto front


def test_pareto_front_and_the_tokenizer_rule_on_a_hand_made_set() -> None:
    objectives = [("recon_psnr", "max"), ("codebook_size", "min")]
    points = [
        {"recon_psnr": 30.0, "codebook_size": 1000},  # 0 front
        {"recon_psnr": 29.8, "codebook_size": 240},  # 1 front: smallest codebook
        {"recon_psnr": 30.3, "codebook_size": 15360},  # 2 front: best PSNR
        {"recon_psnr": 29.0, "codebook_size": 1000},  # 3 dominated by 0
        {"recon_psnr": 28.0, "codebook_size": 4375},  # 4 dominated by 0 and 2
        {"recon_psnr": math.nan, "codebook_size": 100},  # 5 no PSNR: never on the front
        {"recon_psnr": 29.9, "codebook_size": 240},  # 6 front: beats 1 at the same size
    ]
    front = pareto_front(points, objectives)
    assert front == [0, 2, 6]
    on_front = [points[i] for i in front]
    # the smallest codebook within 0.5 dB of the best PSNR (30.3): 240 at 29.9 dB
    assert choose(on_front, objectives, smallest_codebook_near_best_psnr) == 2
    assert choose(on_front, objectives) == 1  # default: the best primary metric
    tight = [{"recon_psnr": 31.0, "codebook_size": 15360}, *on_front]
    assert on_front[0] == tight[1]
    assert smallest_codebook_near_best_psnr(tight) == 0  # nothing else within 0.5 dB
    assert pareto_front(points, [("codebook_size", "min")]) == [5]
    with pytest.raises(ValueError, match="empty"):
        choose([], objectives)


def test_stage_objectives_are_validated() -> None:
    stage = get_family("maskgit_fsq").stage("tokenizer")
    assert stage.objectives == (("codebook_size", "min"),) and stage.select is not None
    fields = {**stage.__dict__}
    with pytest.raises(ValueError, match="mode of 'codebook_size'"):
        Stage(**{**fields, "objectives": (("codebook_size", "smallest"),)})
    with pytest.raises(ValueError, match="listed twice"):
        Stage(**{**fields, "objectives": (("recon_psnr", "max"),)})
    with pytest.raises(ValueError, match="select needs objectives"):
        Stage(**{**fields, "objectives": ()})
    assert get_family("maskgit_fsq").final.objectives == ()  # single-objective stage


# --------------------------------------------------------------------------- search space


def test_search_space_levels_and_first_points() -> None:
    space = load_search_space("maskgit_fsq")
    tok = space.for_stage("tokenizer")
    kind, levels = tok.params["fsq_levels"]
    assert kind == "choice" and set(PAPER_LEVELS) <= set(levels)
    assert len({p["fsq_levels"] for p in tok.points}) == 2  # the smoke test's two tuples
    assert space.for_stage("maskgit").points == []
    assert set(space.for_stage("maskgit").params["schedule"][1]) == set(SCHEDULES)
    body = {
        "family": "maskgit_fsq",
        "stages": {
            "tokenizer": {
                "params": {"fsq_levels": {"choice": ["8,6,5", "8,8,8"]}},
                "points_to_evaluate": [{"fsq_levels": "8,5,5,5"}],
            }
        },
    }
    with pytest.raises(ConfigError, match="outside its choice"):
        parse_search_space(body)
    body["stages"]["tokenizer"]["points_to_evaluate"] = [{"lr_tokenizer": 1e-3}]
    with pytest.raises(ConfigError, match="exactly the searched parameters"):
        parse_search_space(body)


# --------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory):
    """phase_gan's builder, as the family uses it: native -> every other phase, 16^3 patches."""
    out = tmp_path_factory.mktemp("maskgit_fsq") / "shards"
    manifest = SPEC.build_shards(
        out=out, phantom=2, config=BUILD, options={"source_phases": ["native"]}, progress=False
    )
    assert manifest.family == SPEC.shards_family == "phase_gan"
    table = read_split(Path(out), "train", SPEC.columns)
    batch = {c: torch.as_tensor(np.array(column_numpy(table[c])))[:4] for c in SPEC.columns}
    return DataInfo.from_manifest(manifest), batch


def test_registered_with_two_stages_on_phase_gan_shards() -> None:
    spec = get_family("maskgit_fsq")
    assert spec is SPEC and spec.stage_names() == ["tokenizer", "maskgit"]
    assert spec.final.ema == ("transformer",) and spec.baselines == ("identity",)
    assert spec.data_family == "phase_gan" and get_family("phase_gan").shards_family == "phase_gan"


def test_geometry_checks_name_the_fix() -> None:
    cfg = _cfg()
    assert check_geometry(cfg, (16, 16, 16)) == (4, 4, 4)
    with pytest.raises(ValueError, match="not divisible by 4"):
        check_geometry(cfg, (16, 16, 14))
    with pytest.raises(ValueError, match="lower disc_layers"):
        check_geometry(_cfg(disc_layers=3), (16, 16, 16))
    demo = from_dict(MaskGITFSQConfig, SPEC.preset("demo"))
    assert check_geometry(demo, (32, 32, 16)) == (8, 8, 4)
    a100 = from_dict(MaskGITFSQConfig, SPEC.preset("a100"))
    assert check_geometry(a100, (64, 64, 64)) == (16, 16, 16)


def _changed(before: dict[str, torch.Tensor], module: nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_tokenizer_step_trains_and_reports_codebook_statistics(shards) -> None:
    data, batch = shards
    torch.manual_seed(0)
    stage = SPEC.stage("tokenizer")
    ctx = local_context(SPEC, _cfg(), data, stage="tokenizer")
    before = {k: v.clone() for k, v in ctx.models["tokenizer"].state_dict().items()}
    losses = stage.train_step(ctx, batch)
    assert {"loss/l1", "loss/ssim", "loss/adv", "loss/d"} <= set(losses)  # debug: no warm-up
    assert _changed(before, ctx.models["tokenizer"])
    ctx.models = {k: m.eval() for k, m in ctx.models.items()}
    with torch.no_grad():
        metrics = stage.eval_step(ctx, batch)
    rows = batch["source"].shape[0]
    assert all(v.shape == (rows,) for v in metrics.values())
    assert float(metrics["codebook_size"][0]) == 200  # debug levels 8,5,5
    assert float(metrics["bits_per_volume"][0]) == pytest.approx(64 * math.log2(200))
    assert 0 < float(metrics["codebook_usage"][0]) <= 2 * rows * 64 / 200
    assert 1 <= float(metrics["perplexity"][0]) <= 200


def test_maskgit_stage_freezes_the_tokenizer_and_predicts_every_phase(shards) -> None:
    data, batch = shards
    cfg = _cfg()
    torch.manual_seed(0)
    stage = SPEC.stage("maskgit")
    ctx = local_context(SPEC, cfg, data, stage="maskgit")
    tok, net = ctx.models["tokenizer"], ctx.models["transformer"]
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())
    frozen = {k: v.clone() for k, v in tok.state_dict().items()}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    losses = stage.train_step(ctx, batch)
    assert {"loss/ce", "masked_acc"} <= set(losses)
    assert not _changed(frozen, tok) and _changed(before, net)
    net.eval()
    with torch.no_grad():
        metrics = stage.eval_step(ctx, batch)
        x = batch["source"][:2, None].float()
        cond = SPEC.parse_conditioning({"target_phase": "arterial"})
        y = SPEC.predict(ctx.models, x, cfg, cond)
        again = SPEC.predict(ctx.models, x, cfg, cond)
        fast = SPEC.predict(ctx.models, x, cfg, {**cond, "steps": 1, "temperature": 0.0})
    for key in ("mae_hu", "psnr", "ssim", "balanced_mae_hu", "roi_aorta_hu"):
        assert metrics[key].shape == (4,) and f"identity_{key}" in metrics
    assert "arterial/mae_hu" in metrics and "oracle_mae_hu" in metrics
    assert y.shape == x.shape and 0 <= float(y.min()) <= float(y.max()) <= 1
    torch.testing.assert_close(y, again)  # seeded decoding: repeatable
    assert fast.shape == x.shape
    with pytest.raises(ValueError, match="token grid"):
        SPEC.predict(ctx.models, torch.rand(1, 1, 32, 16, 16), cfg, cond)


def test_steps_and_temperature_are_optional_conditioning() -> None:
    parsed = SPEC.parse_conditioning({"target_phase": "venous"})
    assert parsed == {"target_phase": 1, "steps": None, "temperature": None}
    parsed = SPEC.parse_conditioning({"target_phase": "a", "steps": "4", "temperature": "0.5"})
    assert parsed == {"target_phase": 0, "steps": 4, "temperature": 0.5}
    assert parse_steps("auto") is None and parse_temperature("AUTO") is None
    for bad in ("0", "65", "2.5", "many"):
        with pytest.raises(ValueError, match="steps must be"):
            parse_steps(bad)
    for bad in ("-1", "nan", "hot", "11"):
        with pytest.raises(ValueError, match="temperature must be"):
            parse_temperature(bad)


# --------------------------------------------------------------------------- learning


def test_tokenizer_learns_and_uses_its_codebook(tmp_path: Path) -> None:
    """A short CPU training (4 phantoms, 36 rows of 16^3, 6 epochs, ~8 s) must raise the
    reconstruction PSNR well above the untrained tokenizer's and spread over the codebook.

    Measured when written: 6.9 dB untrained, 20.6 dB after 6 epochs; perplexity 1 -> 34, usage
    0.5% -> 27% of 200 codes. The margins are about half. A tokenizer whose latents leave the
    FSQ bound's linear range collapses onto one code (perplexity 1): this test catches it.
    """
    torch.set_num_threads(1)
    build = BuildConfig(patch_size=(16, 16, 16), spacing=(8.0, 8.0, 8.0), patches_per_subject=4)
    manifest = SPEC.build_shards(
        out=tmp_path, phantom=4, config=build, options={"source_phases": ["native"]}, progress=False
    )
    data = DataInfo.from_manifest(manifest)
    train, val = (
        {c: torch.as_tensor(np.array(column_numpy(t[c]))) for c in SPEC.columns}
        for t in (read_split(tmp_path, s, SPEC.columns) for s in ("train", "val"))
    )
    torch.manual_seed(0)
    ctx = local_context(SPEC, _cfg(adv_weight=0.0), data, stage="tokenizer", grad_clip=1.0)
    stage = SPEC.stage("tokenizer")

    def evaluate() -> dict[str, float]:
        ctx.models["tokenizer"].eval()
        with torch.no_grad():
            out = {k: float(v.mean()) for k, v in stage.eval_step(ctx, val).items()}
        ctx.models["tokenizer"].train()
        return out

    before = evaluate()
    order_gen = torch.Generator().manual_seed(0)
    rows = train["source"].shape[0]
    for _ in range(6):
        order = torch.randperm(rows, generator=order_gen)
        for start in range(0, rows, 4):
            ctx.step = ctx.optimize.step
            stage.train_step(ctx, {k: v[order[start : start + 4]] for k, v in train.items()})
            ctx.optimize.end_batch()
    after = evaluate()
    assert after["recon_psnr"] >= before["recon_psnr"] + 7.0, (before, after)
    assert after["perplexity"] >= 16 and after["codebook_usage"] >= 0.12, after


def test_the_ema_copy_of_the_transformer_decodes_like_the_transformer(shards) -> None:
    """The transformer holds FSQ index tables as integer buffers; the loop's EMA must copy
    them, not average them (an averaged basis 200 truncated to 199 garbled every code)."""
    from ctray.train.state import make_ema

    data, batch = shards
    cfg = _cfg(fsq_levels="8,5,5,5")  # basis 1, 8, 40, 200: 200 went wrong after 31 updates
    torch.manual_seed(0)
    ctx = local_context(SPEC, cfg, data, stage="maskgit")
    ema = make_ema(ctx.models["transformer"], 0.995)
    SPEC.stage("maskgit").train_step(ctx, batch)
    for _ in range(40):
        ema.update_parameters(ctx.models["transformer"])
    net, copy = ctx.models["transformer"], ema.module
    assert torch.equal(copy.fsq.basis, net.fsq.basis)
    with torch.no_grad():
        torch.testing.assert_close(copy.fsq.indices_to_codes(torch.arange(1000)), net.codebook)
