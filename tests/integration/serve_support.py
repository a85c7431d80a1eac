"""Helpers shared by the Serve integration tests: a tiny model to serve, ports, phantoms, and
the replica's own view of its memory (GET /v1/status)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx

from ctray.data.nifti import Volume, nifti_bytes
from ctray.data.phantom import PhantomConfig, make_phantom

TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def export_test_model(out: Path) -> Path:
    """An untrained debug phase-GAN (16^3 patches at 8 mm) whose output head is randomised, so
    it changes the image (a zero head is the identity, which would hide voxel-order mistakes)."""
    import torch

    from ctray.config import from_dict, to_dict
    from ctray.modeldir import export_model
    from ctray.registry import DataInfo, get_family

    spec = get_family("phase_gan")
    cfg = from_dict(spec.config_cls, spec.preset("debug"))
    window = {"lo": -1000.0, "hi": 1000.0}
    info = DataInfo(patch_size=(16, 16, 16), spacing=(8.0, 8.0, 8.0), window=window)
    torch.manual_seed(0)
    models = spec.build_models(cfg, info)
    # not the identity: a random change, the output gate half open
    torch.nn.init.normal_(models["generator"].delta.weight, std=0.05)
    torch.nn.init.constant_(models["generator"].gate.bias, 0.0)
    return export_model(
        out,
        spec=spec,
        family_config=to_dict(cfg),
        data={"patch_size": [16, 16, 16], "spacing": [8.0, 8.0, 8.0], "window": window},
        state={k: m.state_dict() for k, m in models.items()},
        metrics={"balanced_mae_hu": 50.0, "identity_balanced_mae_hu": 60.0},
    )


def phantom(seed: int = 11, shape=(40, 36, 20), spacing=(5.0, 5.0, 6.0)) -> Volume:
    return make_phantom(seed, config=PhantomConfig(shape=shape, spacing=spacing))[0]


def phantom_bytes(seed: int = 5, shape=(24, 24, 12), spacing=(8.0, 8.0, 8.0)) -> bytes:
    """A small valid upload (.nii.gz, int16 HU) the tiny model answers in tens of ms."""
    vol = phantom(seed, shape=shape, spacing=spacing)
    return nifti_bytes(vol.array, vol.affine)


def replica_status(url: str, token: str | None = None) -> dict[str, Any]:
    """The replica's id, pid, resident memory now and at its peak, and admission counters."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"{url}/v1/status", headers=headers, timeout=TIMEOUT)
    r.raise_for_status()
    return r.json()
