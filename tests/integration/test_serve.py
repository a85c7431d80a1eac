"""`ctray serve` for real: Ray Serve on 127.0.0.1, HTTP over loopback, no mocks.

Two applications share one Serve instance (started once for this module, deleted at the end):
``/`` hosts a test model plus the model exported by the smoke tune run, with batching; ``/secure``
hosts the test model with a bearer token and batching off.
"""

from __future__ import annotations

import gzip
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from serve_support import TIMEOUT, export_test_model, free_port, phantom

from ctray.data.nifti import Volume, load_nifti, nifti_bytes, save_nifti
from ctray.serve import CtrayClient, ServeConfig, ServeError

TOKEN = "test-token-0123456789"
MAX_BODY_MB = 2.0
MAX_VOXELS = 4_000_000


@dataclass(frozen=True, kw_only=True)
class Server:
    url: str
    secure_url: str
    models: Path
    replica: str


@pytest.fixture(scope="module")
def models_dir(
    tmp_path_factory: pytest.TempPathFactory, smoke_export: Path, pix2pix_smoke_export: Path
) -> Path:
    root = tmp_path_factory.mktemp("serve_models")
    export_test_model(root / "tiny")
    shutil.copytree(smoke_export / "smoke", root / "smoke")
    shutil.copytree(pix2pix_smoke_export / "smoke", root / "p2p")
    return root


@pytest.fixture(scope="module")
def server(ray_session, models_dir: Path) -> Iterator[Server]:
    from ctray.serve.server import start, stop

    port = free_port()
    main = ServeConfig(
        models=models_dir,
        port=port,
        max_body_mb=MAX_BODY_MB,
        max_voxels=MAX_VOXELS,
        max_batch_size=4,
        batch_wait_ms=50,
        max_queue=64,
        memory_budget_mb=512,
        app_name="ctray-test",
    )
    secure = ServeConfig(
        models=models_dir / "tiny",
        port=port,
        token=TOKEN,
        batching=False,
        memory_budget_mb=256,
        app_name="ctray-test-secure",
        route_prefix="/secure",
    )
    url = start(main)
    try:
        secure_url = start(secure)
        replica = httpx.get(f"{url}/healthz", timeout=TIMEOUT).json()["replica"]
        yield Server(url=url, secure_url=secure_url, models=models_dir, replica=replica)
    finally:
        stop(secure, shutdown=False)
        stop(main, shutdown=True)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[CtrayClient]:
    with CtrayClient(server.url, timeout=TIMEOUT) as c:
        yield c


def _reoriented(vol: Volume, kind: str) -> Volume:
    """The same world image with another voxel order: LPS (flip i, j) or permuted axes."""
    if kind == "lps":
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        n = vol.shape
        shift = np.eye(4)
        shift[:3, 3] = [n[0] - 1, n[1] - 1, 0]
        return Volume(array=vol.array[::-1, ::-1, :].copy(), affine=vol.affine @ shift @ flip)
    if kind == "permuted":  # voxel axes (k, i, j)
        perm = np.zeros((4, 4))
        perm[0, 1] = perm[1, 2] = perm[2, 0] = perm[3, 3] = 1.0
        return Volume(array=vol.array.transpose(2, 0, 1).copy(), affine=vol.affine @ perm)
    raise ValueError(kind)


def _decode(data: bytes) -> nib.Nifti1Image:
    assert data[:2] == b"\x1f\x8b", "response is not gzip"
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def _assert_error(r: httpx.Response, status: int, code: str, *needles: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == code, body
    for needle in needles:
        assert needle in body["detail"], (needle, body["detail"])


# --------------------------------------------------------------------------- happy paths


def test_health_and_model_list(server: Server, client: CtrayClient) -> None:
    health = client.health()
    assert health["status"] == "ok" and health["models"] == 3
    listed = {m["name"]: m for m in client.models()}
    assert set(listed) == {"tiny", "smoke", "p2p"}
    assert listed["p2p"]["family"] == "pix2pix"
    tiny = listed["tiny"]
    assert tiny["family"] == "phase_gan"
    assert tiny["input"] == {
        "spacing": [8.0, 8.0, 8.0],
        "patch_size": [16, 16, 16],
        "window": {"lo": -1000.0, "hi": 1000.0},
    }
    assert "venous" in tiny["conditioning"]["target_phase"]["help"]
    assert tiny["metrics"] == {"balanced_mae_hu": 50.0, "identity_balanced_mae_hu": 60.0}
    assert np.isfinite(listed["smoke"]["metrics"]["mae_hu"])


@pytest.mark.parametrize("kind", ["lps", "permuted"])
def test_round_trip_keeps_grid_and_hu(server: Server, client: CtrayClient, kind: str) -> None:
    from ctray.inference import predict_volume
    from ctray.modeldir import load_model

    ras = phantom()
    vol = _reoriented(ras, kind)
    out = _decode(client.predict(nifti_bytes(vol.array, vol.affine), "tiny", target_phase="venous"))
    assert out.shape == vol.shape
    np.testing.assert_allclose(out.affine, vol.affine, atol=1e-4)
    assert out.get_data_dtype() == np.int16
    got = np.asarray(out.dataobj).astype(np.float32)
    air = vol.array < -990
    # air stays air (this random model shifts it by tens of HU; a voxel-order or orientation
    # mistake would put tissue there)
    assert air.mean() > 0.1 and (got[air] < -850).mean() > 0.95 and np.median(got[air]) < -900
    # the model really changes the image, and Serve returns exactly what it computes in-process
    assert np.abs(got - vol.array)[~air].mean() > 5.0
    local = predict_volume(
        load_model(server.models / "tiny"), vol, {"target_phase": "venous"}
    ).array
    assert np.abs(got - np.clip(np.rint(local), -32768, 32767)).max() <= 1.0
    # the same world image in RAS order gives the same voxels, reordered
    ras_out = _decode(
        client.predict(nifti_bytes(ras.array, ras.affine), "tiny", target_phase="venous")
    )
    back = np.asarray(ras_out.dataobj).astype(np.float32)
    expected = _reoriented(Volume(array=back, affine=ras.affine), kind).array
    assert np.abs(got - expected).max() <= 1.0


def test_real_ct_through_the_endpoint(client: CtrayClient, real_ct_dir: Path) -> None:
    path = real_ct_dir / "abdomen_native.nii.gz"
    vol = load_nifti(path)
    out = _decode(client.predict(path, "tiny", target_phase="arterial"))
    assert out.shape == vol.shape == (122, 101, 30)
    np.testing.assert_allclose(out.affine, vol.affine, atol=1e-4)
    got = np.asarray(out.dataobj)
    assert got.dtype == np.int16
    assert np.abs(got - vol.array).mean() < 200, "the real CT must come back as the same anatomy"


def test_smoke_tuned_model_is_hosted_and_answers(client: CtrayClient) -> None:
    vol = phantom(seed=3, shape=(32, 32, 16), spacing=(8.0, 8.0, 8.0))
    data = client.predict(nifti_bytes(vol.array, vol.affine), "smoke", target_phase="delayed")
    out = _decode(data)
    assert out.shape == vol.shape
    np.testing.assert_allclose(out.affine, vol.affine, atol=1e-4)


def test_pix2pix_model_is_hosted_without_serve_side_changes(client: CtrayClient) -> None:
    """A 2D slice model (the pix2pix smoke export) through the same generic endpoint."""
    vol = _reoriented(phantom(seed=5, shape=(40, 36, 12), spacing=(6.0, 6.0, 5.0)), "lps")
    out = _decode(client.predict(nifti_bytes(vol.array, vol.affine), "p2p"))
    assert out.shape == vol.shape
    np.testing.assert_allclose(out.affine, vol.affine, atol=1e-4)
    with pytest.raises(ServeError) as err:  # pix2pix takes no conditioning
        client.predict(nifti_bytes(vol.array, vol.affine), "p2p", target_phase="venous")
    assert err.value.status == 422 and "target_phase" in str(err.value)


# --------------------------------------------------------------------------- errors


def _huge_header() -> bytes:
    """A valid-looking header claiming 10^9 int16 voxels, followed by a few bytes only."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1000, 1000, 1000))
    hdr.set_data_dtype(np.int16)
    hdr.set_xyzt_units("mm")
    hdr["pixdim"][1:4] = 1.0
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\x00" * 4 + b"\x00" * 1024
    return gzip.compress(raw)


def _good() -> bytes:
    vol = phantom(seed=5, shape=(24, 24, 12), spacing=(8.0, 8.0, 8.0))
    return nifti_bytes(vol.array, vol.affine)


def _chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    for _ in range(total // size):
        yield b"\x00" * size


# fmt: off
BAD: dict[str, tuple[Callable[[], bytes], str, int, str, tuple[str, ...]]] = {
    # name: (body, query, status, error code, words the detail must contain)
    "not_nifti": (lambda: b"this is a text file, not a volume" * 20, "", 422, "invalid_nifti",
                  ("not a NIfTI",)),
    "truncated_gzip": (lambda: _good()[: len(_good()) // 2], "", 422, "invalid_nifti",
                       ("truncated",)),
    "2d": (lambda: nifti_bytes(np.random.default_rng(0).normal(size=(32, 32)), np.eye(4)), "",
           422, "invalid_nifti", ("2D",)),
    "5d": (lambda: nifti_bytes(np.random.default_rng(0).normal(size=(8, 8, 8, 2, 2)), np.eye(4)),
           "", 422, "invalid_nifti", ("4 volumes",)),
    "nan": (lambda: nifti_bytes(np.where(np.arange(512).reshape(8, 8, 8) % 7 == 0, np.nan,
                                         np.arange(512.0).reshape(8, 8, 8)), np.eye(4),
                                dtype=np.float32), "", 422, "invalid_nifti", ("NaN",)),
    "constant": (lambda: nifti_bytes(np.full((8, 8, 8), 40.0), np.eye(4)), "", 422,
                 "invalid_nifti", ("constant",)),
    "huge_header": (_huge_header, "", 413, "volume_too_large", ("1,000,000,000", "limit")),
    "empty": (lambda: b"", "", 400, "empty_body", ("empty",)),
    "unknown_phase": (_good, "?target_phase=portal-ish", 422, "invalid_conditioning",
                      ("venous", "arterial")),
    "unknown_key": (_good, "?target_phase=venous&contrast=5", 422, "invalid_conditioning",
                    ("contrast", "target_phase")),
    "missing_phase": (_good, "", 422, "invalid_conditioning", ("needs target_phase",)),
}
# fmt: on


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_4xx_with_a_reason(server: Server, case: str) -> None:
    body, query, status, code, needles = BAD[case]
    query = query or ("" if case == "missing_phase" else "?target_phase=venous")
    r = httpx.post(f"{server.url}/v1/models/tiny/predict{query}", content=body(), timeout=TIMEOUT)
    _assert_error(r, status, code, *needles)
    assert httpx.get(f"{server.url}/healthz", timeout=TIMEOUT).json()["replica"] == server.replica


def test_body_over_limit_is_413_declared_or_streamed(server: Server) -> None:
    url = f"{server.url}/v1/models/tiny/predict?target_phase=venous"
    size = int((MAX_BODY_MB + 1) * 2**20)
    r = httpx.post(url, content=b"\x00" * size, timeout=TIMEOUT)  # Content-Length
    _assert_error(r, 413, "body_too_large", "limit")
    r = httpx.post(url, content=_chunks(size), timeout=TIMEOUT)  # chunked: no Content-Length
    _assert_error(r, 413, "body_too_large", "limit")
    assert httpx.get(f"{server.url}/healthz", timeout=TIMEOUT).json()["replica"] == server.replica


def test_unknown_model_and_route(server: Server) -> None:
    r = httpx.post(f"{server.url}/v1/models/nope/predict", content=_good(), timeout=TIMEOUT)
    _assert_error(r, 404, "unknown_model", "nope", "smoke", "tiny")
    _assert_error(httpx.get(f"{server.url}/v2/whatever", timeout=TIMEOUT), 404, "not_found")
    with CtrayClient(server.url, timeout=TIMEOUT) as c, pytest.raises(ServeError) as err:
        c.predict(_good(), "nope", target_phase="venous")
    assert err.value.status == 404 and "available: p2p, smoke, tiny" in str(err.value)


def test_token_required_except_healthz(server: Server) -> None:
    base = server.secure_url
    assert httpx.get(f"{base}/healthz", timeout=TIMEOUT).json()["status"] == "ok"
    r = httpx.get(f"{base}/v1/models", timeout=TIMEOUT)
    _assert_error(r, 401, "unauthorized", "missing bearer token")
    assert r.headers["www-authenticate"] == "Bearer"
    bad = {"Authorization": "Bearer not-the-token"}
    _assert_error(
        httpx.get(f"{base}/v1/models", headers=bad, timeout=TIMEOUT), 401, "unauthorized", "wrong"
    )
    r = httpx.post(
        f"{base}/v1/models/tiny/predict?target_phase=venous",
        content=_good(),
        headers=bad,
        timeout=TIMEOUT,
    )
    _assert_error(r, 401, "unauthorized")
    with CtrayClient(base, token=TOKEN, timeout=TIMEOUT) as c:
        assert [m["name"] for m in c.models()] == ["tiny"]
        out = _decode(c.predict(_good(), "tiny", target_phase="venous"))
        assert out.shape == (24, 24, 12)
    # the open app needs no token
    assert httpx.get(f"{server.url}/v1/models", timeout=TIMEOUT).status_code == 200


def test_fifty_concurrent_requests_are_batched_and_not_mixed_up(server: Server) -> None:
    vols = [phantom(seed=s, shape=(24, 24, 12), spacing=(8.0, 8.0, 8.0)) for s in range(4)]
    bodies = [nifti_bytes(v.array, v.affine) for v in vols]
    jobs = [
        (i % 4, ("tiny", "smoke")[(i // 4) % 2], ("venous", "arterial")[(i // 8) % 2])
        for i in range(50)
    ]

    def call(job: tuple[int, str, str]) -> httpx.Response:
        v, model, phase = job
        return httpx.post(
            f"{server.url}/v1/models/{model}/predict?target_phase={phase}",
            content=bodies[v],
            timeout=TIMEOUT,
        )

    reference = {job: _decode(call(job).content).get_fdata() for job in set(jobs)}
    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(call, jobs))
    assert [r.status_code for r in responses] == [200] * 50
    for job, r in zip(jobs, responses, strict=True):
        assert r.headers["x-ctray-model"] == job[1]
        assert np.abs(_decode(r.content).get_fdata() - reference[job]).max() <= 1.0
    assert max(int(r.headers["x-ctray-batch-size"]) for r in responses) > 1, "never batched"


# --------------------------------------------------------------------------- CLI


def test_cli_predict_writes_a_nifti(server: Server, tmp_path: Path, capsys) -> None:
    from ctray.cli import main

    vol = phantom(seed=7, shape=(24, 20, 12), spacing=(6.0, 6.0, 9.0))
    src = save_nifti(tmp_path / "ct.nii.gz", vol.array, vol.affine)
    out = tmp_path / "out" / "venous.nii.gz"
    rc = main(
        [
            "predict",
            "--url",
            server.url,
            "--model",
            "tiny",
            "--target-phase",
            "venous",
            str(src),
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    got = load_nifti(out)
    assert got.shape == vol.shape
    np.testing.assert_allclose(got.affine, vol.affine, atol=1e-4)
    capsys.readouterr()
    rc = main(
        [
            "predict",
            "--url",
            server.url,
            "--model",
            "tiny",
            "--cond",
            "target_phase=nope",
            str(src),
            "-o",
            str(tmp_path / "x.nii.gz"),
        ]
    )
    # one line from the CLI (Ray may forward replica log lines to this process's stderr too)
    ours = [line for line in capsys.readouterr().err.splitlines() if "ServeReplica" not in line]
    assert rc == 2 and len(ours) == 1, ours
    assert ours[0].startswith("error: HTTP 422: invalid_conditioning: unknown phase 'nope'")
    assert not (tmp_path / "x.nii.gz").exists()
    rc = main(
        [
            "predict",
            "--url",
            server.secure_url,
            "--model",
            "tiny",
            "--target-phase",
            "1",
            "--token",
            TOKEN,
            str(src),
            "-o",
            str(out),
        ]
    )
    assert rc == 0 and load_nifti(out).shape == vol.shape


def test_cli_models_table(server: Server, capsys) -> None:
    from ctray.cli import main

    assert main(["models", str(server.models)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["NAME", "FAMILY", "STAGE", "METRIC", "VALUE", "BASELINE"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"p2p", "smoke", "tiny"}
    assert rows["tiny"][1:8] == [
        "phase_gan",
        "train",
        "balanced_mae_hu",
        "(min)",
        "50",
        "identity",
        "60",
    ]


def test_health_replica_unchanged_after_everything(server: Server) -> None:
    time.sleep(0.1)
    assert httpx.get(f"{server.url}/healthz", timeout=TIMEOUT).json()["replica"] == server.replica
