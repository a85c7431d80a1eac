"""The serving pieces that need no Ray: config, request checks, catalog, client errors."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctray.config import ConfigError
from ctray.data.nifti import nifti_bytes
from ctray.registry import get_family
from ctray.serve import CtrayClient, ServeConfig, ServeError
from ctray.serve.config import REPLICA_BASE_MB, TOKEN_ENV, is_loopback
from ctray.serve.errors import ApiError
from ctray.serve.handling import (
    check_content_length,
    check_token,
    decode_volume,
    encode_volume,
    parse_conditioning,
    read_body,
)


def _code(fn, *args, **kw) -> tuple[int, str, str]:
    with pytest.raises(ApiError) as err:
        fn(*args, **kw)
    return err.value.status, err.value.error, err.value.detail


def test_config_defaults_are_local_and_validated(tmp_path: Path) -> None:
    cfg = ServeConfig(models=tmp_path)
    assert cfg.host == "127.0.0.1" and cfg.url == "http://127.0.0.1:8000"
    assert cfg.max_body_bytes == 256 * 2**20
    opts = cfg.deployment_options()
    assert opts["num_replicas"] == 1 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"] == {
        "num_cpus": 1.0,
        "num_gpus": 0.0,
        "memory": (4096 + REPLICA_BASE_MB) * 2**20,
    }
    assert opts["max_ongoing_requests"] > cfg.max_queue  # excess requests reach the 503
    auto = ServeConfig(models=tmp_path, replicas=2, max_replicas=5, num_gpus_per_replica=1)
    opts = auto.deployment_options()
    assert "num_replicas" not in opts
    assert opts["autoscaling_config"]["min_replicas"] == 2
    assert opts["autoscaling_config"]["max_replicas"] == 5
    assert opts["ray_actor_options"]["num_gpus"] == 1
    for bad in ({"port": 0}, {"max_batch_size": 0}, {"replicas": 3, "max_replicas": 2},
                {"token": "short"}, {"overlap": 1.0}, {"max_queue": 0},
                {"memory_budget_mb": 0}):  # fmt: skip
        with pytest.raises(ConfigError):
            ServeConfig(models=tmp_path, **bad)


def test_replica_memory_is_reserved_from_the_limits(tmp_path: Path) -> None:
    from ctray.serve.server import check_memory

    cfg = ServeConfig(models=tmp_path, memory_budget_mb=512, max_queue=4)
    opts = cfg.deployment_options(model_bytes=3 * 2**20)
    assert opts["ray_actor_options"]["memory"] == (512 + REPLICA_BASE_MB + 3) * 2**20
    check_memory(2**30, 2**31)
    with pytest.raises(ConfigError, match="--memory-budget-mb"):
        check_memory(2**31, 2**30)  # no node could hold it: say so, do not wait forever


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "ct-server.example.org", "[::]"]
)
def test_public_bind_needs_a_token_or_insecure(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError, match=f"refusing to listen on .*{TOKEN_ENV}.*--insecure"):
        ServeConfig(models=tmp_path, host=host)
    assert ServeConfig(models=tmp_path, host=host, token="long-enough-token").host == host
    assert ServeConfig(models=tmp_path, host=host, insecure=True).insecure


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_bind_needs_no_token(tmp_path: Path, host: str) -> None:
    assert is_loopback(host)
    assert ServeConfig(models=tmp_path, host=host).token is None


def test_cli_refuses_an_open_public_server_before_starting_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ctray.cli import main

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    started = _ray_started()
    rc = main(["serve", "--models", str(tmp_path), "--host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert rc == 2 and "refusing to listen on 0.0.0.0" in err and "--insecure" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert _ray_started() == started, "Ray was started for a server that must not start"


def test_tune_script_checks_its_serve_settings_before_tuning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--serve runs after hours of tuning: a setting it would refuse must fail at once."""
    from ctray.experiment import run

    monkeypatch.setenv(TOKEN_ENV, "short")
    started = _ray_started()
    assert run("phase_gan", ["--serve"]) == 2
    assert "token must have at least 8 characters" in capsys.readouterr().err
    assert _ray_started() == started


def _ray_started() -> bool:
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def test_token_is_kept_only_as_a_digest(tmp_path: Path) -> None:
    cfg = ServeConfig(models=tmp_path, token="s3cret-token")
    assert "s3cret" not in repr(cfg)
    digest = cfg.token_digest()
    assert digest == hashlib.sha256(b"s3cret-token").digest()
    check_token("Bearer s3cret-token", digest)
    check_token(None, None)  # no token configured: open
    assert _code(check_token, None, digest)[:2] == (401, "unauthorized")
    assert "wrong" in _code(check_token, "Bearer s3cret-tokem", digest)[2]
    assert _code(check_token, "Basic s3cret-token", digest)[0] == 401


def test_conditioning_errors_list_the_valid_values() -> None:
    spec = get_family("phase_gan")
    assert parse_conditioning(spec, [("target_phase", "venous")]) == {"target_phase": 1}
    status, code, detail = _code(parse_conditioning, spec, [("target_phase", "pre-historic")])
    assert (status, code) == (422, "invalid_conditioning") and "venous" in detail
    assert "target_phase" in _code(parse_conditioning, spec, [("phase", "venous")])[2]
    assert "twice" in _code(parse_conditioning, spec, [("target_phase", "1")] * 2)[2]


async def _stream(parts: list[bytes]) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def test_body_limits() -> None:
    check_content_length({"content-length": "100"}, 100)
    assert _code(check_content_length, {"content-length": "101"}, 100)[:2] == (
        413,
        "body_too_large",
    )
    assert _code(check_content_length, {"content-length": "x"}, 100)[0] == 422
    assert asyncio.run(read_body(_stream([b"ab", b"cd"]), 4)) == b"abcd"
    with pytest.raises(ApiError, match="body_too_large"):
        asyncio.run(read_body(_stream([b"ab", b"cd", b"e"]), 4))
    with pytest.raises(ApiError, match="empty_body"):
        asyncio.run(read_body(_stream([]), 4))


def test_decode_refuses_huge_headers_before_allocating() -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1000, 1000, 1000))
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    body = gzip.compress(hdr.binaryblock + b"\x00" * 100)
    status, code, detail = _code(decode_volume, body, max_voxels=10**6)
    assert (status, code) == (413, "volume_too_large") and "1,000,000,000" in detail
    assert _code(decode_volume, b"junk" * 200, max_voxels=10**6)[:2] == (422, "invalid_nifti")


def test_encode_round_trip_keeps_affine_and_int16() -> None:
    rng = np.random.default_rng(0)
    arr = rng.normal(0, 300, size=(10, 9, 8)).astype(np.float32)
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    affine[:3, 3] = [10, 20, -30]
    vol = decode_volume(encode_volume(arr, affine), max_voxels=10**6)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    np.testing.assert_allclose(vol.array, np.rint(arr), atol=0)
    img = nib.Nifti1Image.from_bytes(gzip.decompress(encode_volume(arr, affine)))
    assert img.get_data_dtype() == np.int16


def test_catalog_rejects_duplicate_names_and_empty_folders(tmp_path: Path) -> None:
    from ctray.serve.catalog import discover

    with pytest.raises(FileNotFoundError, match="no exported models"):
        discover(tmp_path)
    meta = (
        '{"format": "ctray-model/1", "name": "m", "family": "phase_gan", "data": {}, "metrics": {}}'
    )
    for sub in ("a/m", "b/m"):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / "model.json").write_text(meta)
    with pytest.raises(ValueError, match="two models are called 'm'"):
        discover(tmp_path)


def test_client_reports_an_unreachable_server() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with CtrayClient(f"http://127.0.0.1:{port}", timeout=5) as c, pytest.raises(ServeError) as err:
        c.health()
    assert err.value.status == 0 and "cannot reach" in str(err.value)
    body = nifti_bytes(np.zeros((4, 4, 4)), np.eye(4))
    with CtrayClient(f"http://127.0.0.1:{port}", timeout=5) as c, pytest.raises(ServeError):
        c.predict(body, "m", target_phase="venous")
