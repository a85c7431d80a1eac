"""The server under fire: a fuzzed predict route, a soak, and admission control (503 +
Retry-After), against real Ray Serve on 127.0.0.1 with the tiny debug phase-GAN.

Two applications share one Serve instance started for this module: ``/`` (fuzz and soak: one
replica, small voxel limit so that no generated upload can start a long inference) and
``/admit`` (a 2-request queue and a 40 MiB memory budget, to fill them on purpose). Every
generated case comes from one seeded generator (``SEED``): a failure names the case's index
and label, and re-running reproduces it.

The soak's full form is 2 minutes (marked slow)::

    pytest tests/integration/test_serve_fuzz_e2e.py -m slow -k soak -s
"""

from __future__ import annotations

import gzip
import io
import struct
import threading
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import nibabel as nib
import numpy as np
import pytest
from serve_support import TIMEOUT, export_test_model, free_port, phantom_bytes, replica_status

from ctray.serve import ServeConfig

SEED = 20261125
N_FUZZ = 1000
MAX_VOXELS = 300_000  # the largest working grid any accepted upload can ask for: < 1 s of work
BUDGET_MB = 512
# Replica memory after the fuzz or soak vs after warm-up (resident now, and peak).
RSS_GROWTH_BOUND = 150 * 2**20
PEAK_GROWTH_BOUND = BUDGET_MB * 2**20
VALID_QUERY = "?target_phase=venous"


@dataclass(frozen=True, kw_only=True)
class Apps:
    url: str
    admit_url: str
    replica: str
    pid: int


@pytest.fixture(scope="module")
def apps(ray_session, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Apps]:
    from ctray.serve.server import start, stop

    root = tmp_path_factory.mktemp("fuzz_models")
    export_test_model(root / "tiny")
    port = free_port()
    main = ServeConfig(
        models=root,
        port=port,
        max_body_mb=4,
        max_voxels=MAX_VOXELS,
        max_queue=32,
        memory_budget_mb=BUDGET_MB,
        app_name="ctray-fuzz",
    )
    admit = ServeConfig(
        models=root,
        port=port,
        max_body_mb=32,
        max_voxels=MAX_VOXELS,
        max_queue=2,
        memory_budget_mb=40,
        batch_wait_ms=5000,  # a batch that never comes must not be waited for
        app_name="ctray-fuzz-admit",
        route_prefix="/admit",
    )
    url = start(main)
    try:
        admit_url = start(admit)
        status = replica_status(url)
        yield Apps(url=url, admit_url=admit_url, replica=status["replica"], pid=status["pid"])
    finally:
        stop(admit, shutdown=False)
        stop(main, shutdown=True)


def _same_replica(apps: Apps) -> dict:
    status = replica_status(apps.url)
    assert (status["replica"], status["pid"]) == (apps.replica, apps.pid), "replica restarted"
    return status


def _check_answer(r: httpx.Response, where: str) -> None:
    """Never a 5xx; an error is JSON with a code and a sentence; a success is a .nii.gz."""
    assert r.status_code < 500, f"{where}: HTTP {r.status_code}: {r.text[:300]}"
    if r.status_code == 200:
        assert r.content[:2] == b"\x1f\x8b", f"{where}: 200 but not gzip"
        return
    assert r.headers["content-type"].startswith("application/json"), (where, r.text[:200])
    body = r.json()
    assert set(body) == {"error", "detail"}, (where, body)
    assert isinstance(body["detail"], str) and len(body["detail"]) > 10, (where, body)


# --------------------------------------------------------------------------- generated uploads


def _valid(rng: np.random.Generator) -> bytes:
    """A small valid volume (int16, uint8 or float32; random size, spacing and orientation),
    uncompressed: mutations edit its header in place."""
    shape = tuple(int(n) for n in rng.integers(4, 20, size=3))
    dtype = rng.choice(["int16", "uint8", "float32"])
    array = rng.normal(0, 300, size=shape).astype(dtype)
    affine = np.diag([*(rng.uniform(2.0, 12.0, size=3) * rng.choice([-1, 1], size=3)), 1.0])
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img.to_bytes()


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)  # no time stamp: the same bytes every run


def _put(raw: bytearray, offset: int, fmt: str, *values: float) -> bytearray:
    struct.pack_into(fmt, raw, offset, *values)
    return raw


NAN, INF = float("nan"), float("inf")
# NIfTI-1 header fields: (offset, struct format) and hostile values for each.
# fmt: off
HOSTILE: dict[str, tuple[int, str, list]] = {
    "dim0": (40, "<h", [-1, 0, 1, 2, 4, 5, 7, 8, 127, -32768]),
    "dim_xyz": (42, "<3h", [(0, 8, 8), (-1, 8, 8), (1, 1, 1), (32767, 32767, 32767),
                            (-32768, 2, 2), (5000, 5000, 5000), (700, 700, 700), (2, 2, 2)]),
    "dim4": (48, "<h", [0, -1, 2, 100, 32767]),
    "datatype": (70, "<h", [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536,
                            1792, 2048, 2304, -1, 255, 32767]),
    "bitpix": (72, "<h", [0, -8, 1, 7, 128, 32767]),
    "pixdim_xyz": (80, "<3f", [(0, 1, 1), (-1, -1, -1), (NAN, 1, 1), (INF, 1, 1), (1e-6, 1, 1),
                               (1e6, 1e6, 1e6), (100, 100, 100), (1e38, 1e38, 1e38),
                               (-0.0, 2, 2)]),
    "qfac": (76, "<f", [0.0, -1.0, NAN, 2.0, INF]),
    "vox_offset": (108, "<f", [0.0, -1.0, 347.0, 348.0, 1e9, 2.0**31, 1e38, 3.4e38, NAN, INF,
                               -INF, 351.5]),
    "scl_slope": (112, "<f", [NAN, INF, -INF, 0.0, -0.0, 1e38, 1e-38, -1.0]),
    "scl_inter": (116, "<f", [NAN, INF, 1e38, -1e38]),
    "qform_code": (252, "<h", [0, 1, 2, 5, -1, 32767]),
    "sform_code": (254, "<h", [0, 1, 4, 5, -1, 32767]),
    "quatern": (256, "<3f", [(NAN, 0, 0), (INF, 0, 0), (1e38, 1e38, 1e38), (2, 2, 2)]),
    "qoffset": (268, "<3f", [(NAN, 0, 0), (1e38, -1e38, INF)]),
    "srow_x": (280, "<4f", [(0, 0, 0, 0), (NAN, 0, 0, 0), (1e38, 0, 0, 0), (INF, 1, 1, 1)]),
    "srow_z": (312, "<4f", [(0, 0, 0, 0), (0, 0, 1e-30, 0), (NAN, NAN, NAN, NAN)]),
    "magic": (344, "<4s", [b"ni1\x00", b"n+2\x00", b"\x00\x00\x00\x00", b"xxxx"]),
    "sizeof_hdr": (0, "<i", [0, 540, 347, -348, 0x5C010000, 2**31 - 1]),  # 348 big-endian
}
# fmt: on


def _mutate_field(rng: np.random.Generator) -> tuple[str, bytes]:
    raw = bytearray(_valid(rng))
    names = list(HOSTILE)
    picks = rng.choice(len(names), size=int(rng.integers(1, 3)), replace=False)
    labels = []
    for i in picks:
        offset, fmt, values = HOSTILE[names[i]]
        value = values[int(rng.integers(len(values)))]
        _put(raw, offset, fmt, *(value if isinstance(value, tuple) else (value,)))
        labels.append(f"{names[i]}={value!r}")
    return "field " + ",".join(labels), bytes(raw)


def _byte_flips(rng: np.random.Generator) -> tuple[str, bytes]:
    raw = bytearray(_valid(rng))
    positions = rng.integers(0, 352, size=int(rng.integers(1, 8)))
    for p in positions:
        raw[p] ^= int(rng.integers(1, 256))
    return f"byte flips at {sorted(int(p) for p in positions)}", bytes(raw)


def _truncated(rng: np.random.Generator) -> tuple[str, bytes]:
    raw = _valid(rng)
    if rng.random() < 0.5:
        raw = _gz(raw)
    cut = int(rng.integers(1, len(raw)))
    return f"truncated at {cut} of {len(raw)}", raw[:cut]


def _short_data(rng: np.random.Generator) -> tuple[str, bytes]:
    raw = _valid(rng)
    data = raw[:352] + raw[352 : len(raw) - int(rng.integers(1, len(raw) - 352))]
    return "valid header, short data", _gz(data) if rng.random() < 0.5 else data


def _huge_claim(rng: np.random.Generator) -> tuple[str, bytes]:
    raw = bytearray(_valid(rng))
    dims = [(32767, 32767, 32767), (2000, 2000, 1000), (1000, 1000, 1), (67, 67, 67),
            (600, 600, 600)][int(rng.integers(5))]  # fmt: skip
    _put(raw, 40, "<4h", 3, *dims)
    return f"claims {dims}", _gz(bytes(raw))


_BOMB: dict[str, bytes] = {}


def _zeros_gz(megabytes: int) -> bytes:
    """A gzip member of ``megabytes`` MiB of zeros (about 1/1000 of that compressed), cached."""
    key = f"zeros{megabytes}"
    if key not in _BOMB:
        c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        chunk = bytes(1 << 20)
        _BOMB[key] = b"".join(c.compress(chunk) for _ in range(megabytes)) + c.flush()
    return _BOMB[key]


def _gzip_bomb(rng: np.random.Generator) -> tuple[str, bytes]:
    kind = int(rng.integers(4))
    if kind == 0:  # no header at all: 256 MiB of zeros
        return "gzip bomb, zeros", _zeros_gz(256)
    raw = bytearray(_valid(rng))
    if kind == 1:  # a header claiming 60^3 float32, then far more data than that
        _put(raw, 40, "<4h", 3, 60, 60, 60)
        _put(raw, 70, "<2h", 16, 32)
        return "gzip bomb after a 60^3 header", _gz(bytes(raw[:352])) + _zeros_gz(256)
    if kind == 2:  # a valid volume followed by a bomb member
        return "valid volume + gzip bomb member", _gz(bytes(raw)) + _zeros_gz(64)
    return "gzip inside gzip", _gz(_gz(bytes(raw)))


def _random_bytes(rng: np.random.Generator) -> tuple[str, bytes]:
    n = int(rng.integers(0, 60_000))
    data = rng.bytes(n)
    prefix = [b"", b"\x1f\x8b", b"\x5c\x01\x00\x00", b"PK\x03\x04", b"\x89PNG\r\n\x1a\n",
              b"\x00" * 128 + b"DICM", b"{\"a\": 1}"][int(rng.integers(7))]  # fmt: skip
    if prefix == b"\x1f\x8b":
        data = _gz(data)
    return f"random {n} bytes after {prefix[:8]!r}", prefix + data


def _nifti2(rng: np.random.Generator) -> tuple[str, bytes]:
    shape = tuple(int(n) for n in rng.integers(4, 16, size=3))
    img = nib.Nifti2Image(rng.normal(0, 300, size=shape).astype(np.float32), np.diag([6] * 3 + [1]))
    raw = bytearray(img.to_bytes())
    kind = int(rng.integers(3))
    if kind == 0:
        _put(raw, 16, "<4q", 3, 2**40, 2**40, 2**40)
    elif kind == 1:
        _put(raw, 168, "<q", 2**62)
    elif kind == 2:
        _put(raw, 112, "<3d", NAN, -1.0, 0.0)
    return f"nifti-2 variant {kind}", bytes(raw)


def _zip(rng: np.random.Generator) -> tuple[str, bytes]:
    def entry(name: str) -> zipfile.ZipInfo:  # a fixed time stamp: the same bytes every run
        info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        return info

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(int(rng.integers(0, 4))):
            z.writestr(entry(f"slice{i}.dcm"), b"\x00" * 128 + b"DICM" + rng.bytes(300))
        if rng.random() < 0.5:
            z.writestr(entry("bomb.dcm"), bytes(8 << 20))
    return "zip of junk DICOM", buf.getvalue()


def _valid_case(rng: np.random.Generator) -> tuple[str, bytes]:
    raw = _valid(rng)
    return "valid", _gz(raw) if rng.random() < 0.5 else raw


GENERATORS: list[tuple[float, Callable[[np.random.Generator], tuple[str, bytes]]]] = [
    (0.30, _mutate_field),
    (0.10, _byte_flips),
    (0.10, _truncated),
    (0.08, _short_data),
    (0.08, _huge_claim),
    (0.05, _gzip_bomb),
    (0.12, _random_bytes),
    (0.04, _nifti2),
    (0.03, _zip),
    (0.10, _valid_case),
]

HOSTILE_QUERIES = [
    "", "?target_phase=", "?target_phase=VENOUS", "?target_phase=4", "?target_phase=-1",
    "?target_phase=1e309", "?target_phase=nan", "?target_phase=inf", "?target_phase=%00",
    "?target_phase=%F0%9F%92%A9", "?target_phase=venous&target_phase=venous",
    "?target_phase=venous&target_phase=arterial", "?target_phase=venous&steps=1e999",
    "?target_phase=venous&temperature=nan", "?target_phase=venous&steps=-3&temperature=1e400",
    "?target_phase=venous&x=" + "a" * 6000, "?" + "&".join(f"k{i}=v" for i in range(300)),
    "?target_phase=" + "9" * 500, "?%ZZ=1", "?target_phase=venous&&&", "?=venous",
    "?target_phase=ven%20ous", "?t%C3%A4rget_phase=venous", "?target_phase=1.5",
    "?target_phase=0x1", "?target_phase=%ff%fe", "?target_phase=venous%00arterial",
    "?target_phase[]=venous", "?target_phase=venous;steps=3", "?TARGET_PHASE=venous",
]  # fmt: skip


def fuzz_cases(n: int, seed: int = SEED) -> Iterator[tuple[int, str, bytes, str]]:
    """(index, label, body, query) for ``n`` cases; the same seed gives the same cases."""
    rng = np.random.default_rng(seed)
    weights = np.array([w for w, _ in GENERATORS])
    for i in range(n):
        _, make = GENERATORS[int(rng.choice(len(GENERATORS), p=weights / weights.sum()))]
        label, body = make(rng)
        query = VALID_QUERY
        if rng.random() < 0.3:
            query = HOSTILE_QUERIES[int(rng.integers(len(HOSTILE_QUERIES)))]
        yield i, label, body, query


def test_fuzzed_uploads_never_5xx_restart_or_grow(apps: Apps) -> None:
    before = _same_replica(apps)
    lock = threading.Lock()
    statuses: Counter[tuple[str, int]] = Counter()
    valid_ok = [0, 0]  # (valid body and query: answered 200, all)

    def send(case: tuple[int, str, bytes, str], http: httpx.Client) -> None:
        i, label, body, query = case
        where = f"case {i} (seed {SEED}): {label}, query {query[:60]!r}"
        r = http.post(f"{apps.url}/v1/models/tiny/predict{query}", content=body)
        _check_answer(r, where)
        with lock:
            statuses[(r.json()["error"] if r.status_code != 200 else "ok", r.status_code)] += 1
            if label == "valid" and query == VALID_QUERY:
                valid_ok[0] += r.status_code == 200
                valid_ok[1] += 1

    cases = list(fuzz_cases(N_FUZZ))
    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        clients = [httpx.Client(timeout=TIMEOUT) for _ in range(4)]
        try:
            list(pool.map(lambda k: [send(c, clients[k]) for c in cases[k::4]], range(4)))
        finally:
            for c in clients:
                c.close()
    seconds = time.perf_counter() - started
    after = _same_replica(apps)
    print(f"\nfuzz: {N_FUZZ} uploads in {seconds:.1f} s; answers {dict(statuses)}")
    print(
        f"replica RSS {before['rss_bytes'] / 2**20:.0f} -> {after['rss_bytes'] / 2**20:.0f} MiB, "
        f"peak {before['peak_rss_bytes'] / 2**20:.0f} -> {after['peak_rss_bytes'] / 2**20:.0f} MiB"
    )
    assert sum(statuses.values()) == N_FUZZ
    assert valid_ok[1] > 20 and valid_ok[0] == valid_ok[1], f"valid uploads refused: {valid_ok}"
    assert after["rss_bytes"] - before["rss_bytes"] < RSS_GROWTH_BOUND
    assert after["peak_rss_bytes"] - before["peak_rss_bytes"] < PEAK_GROWTH_BOUND
    assert after["admission"]["requests"] == 0 and after["admission"]["bytes"] == 0


# --------------------------------------------------------------------------- soak


@pytest.mark.parametrize(
    "seconds", [pytest.param(10, id="10s"), pytest.param(120, id="2min", marks=pytest.mark.slow)]
)
def test_soak_sixteen_clients_mixed(apps: Apps, seconds: float) -> None:
    """16 closed-loop clients for ``seconds``: 3 in 4 requests valid (must all succeed), the
    rest fuzzed uploads (never a 5xx, an error always with a reason); latency reported,
    memory flat."""
    url = f"{apps.url}/v1/models/tiny/predict"
    valid = [phantom_bytes(seed=s) for s in range(4)]
    fuzzed = [(case[2], case[3]) for case in fuzz_cases(64, seed=SEED + 1)]
    for body in valid:  # warm-up: code paths, allocator pools
        assert httpx.post(url + VALID_QUERY, content=body, timeout=TIMEOUT).status_code == 200
    warm = _same_replica(apps)
    deadline = time.perf_counter() + seconds
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    counts = Counter()

    def client(k: int) -> None:
        rng = np.random.default_rng(SEED + 100 + k)
        with httpx.Client(timeout=TIMEOUT) as http:
            while time.perf_counter() < deadline:
                if rng.random() < 0.75:
                    t = time.perf_counter()
                    r = http.post(url + VALID_QUERY, content=valid[int(rng.integers(4))])
                    dt = time.perf_counter() - t
                    with lock:
                        counts["valid"] += 1
                        if r.status_code == 200 and r.content[:2] == b"\x1f\x8b":
                            latencies.append(dt)
                        else:
                            failures.append(f"valid: HTTP {r.status_code} {r.text[:200]}")
                else:
                    body, query = fuzzed[int(rng.integers(len(fuzzed)))]
                    r = http.post(url + query, content=body)
                    with lock:
                        counts["fuzzed"] += 1
                        try:
                            _check_answer(r, "fuzzed upload")
                        except AssertionError as err:
                            failures.append(str(err))

    rss = []  # the replica's resident memory, sampled while the clients run
    with ThreadPoolExecutor(16) as pool:
        running = pool.map(client, range(16))
        while time.perf_counter() < deadline:
            rss.append(replica_status(apps.url)["rss_bytes"] / 2**20)
            time.sleep(seconds / 20)
        list(running)
    end = _same_replica(apps)
    p50, p99 = (float(np.percentile(latencies, q)) * 1e3 for q in (50, 99))
    mid = rss[len(rss) // 2]
    print(
        f"\nsoak {seconds} s, 16 clients: {counts['valid']} valid ({len(latencies)} ok, "
        f"p50 {p50:.0f} ms, p99 {p99:.0f} ms), {counts['fuzzed']} fuzzed; replica RSS MiB: "
        f"after warm-up {warm['rss_bytes'] / 2**20:.0f}, half-way {mid:.0f}, end "
        f"{end['rss_bytes'] / 2**20:.0f}, peak {end['peak_rss_bytes'] / 2**20:.0f}"
    )
    assert not failures, failures[:5]
    assert len(latencies) == counts["valid"] > 16
    assert end["rss_bytes"] - warm["rss_bytes"] < RSS_GROWTH_BOUND
    assert end["rss_bytes"] / 2**20 - mid < RSS_GROWTH_BOUND / 2**20 / 2, "still growing"
    assert end["admission"]["requests"] == 0 and end["admission"]["bytes"] == 0


# --------------------------------------------------------------------------- admission


class _SlowUpload:
    """A request body sent in two parts: the first at once, the rest when ``release`` is set,
    so the request holds its admission slot (and declared bytes) in between."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.release = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        yield self.body[:1024]
        self.release.wait(TIMEOUT)
        yield self.body[1024:]


def _post_slow(url: str, upload: _SlowUpload) -> httpx.Response:
    headers = {"Content-Length": str(len(upload.body))}
    return httpx.post(url, content=iter(upload), headers=headers, timeout=TIMEOUT)


def _wait_admitted(apps: Apps, n: int) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = replica_status(apps.admit_url)
        if status["admission"]["requests"] == n:
            return status
        time.sleep(0.05)
    raise AssertionError(f"never saw {n} admitted requests: {status}")


def _assert_busy(r: httpx.Response, *needles: str) -> None:
    assert r.status_code == 503, (r.status_code, r.text)
    assert int(r.headers["retry-after"]) >= 1
    body = r.json()
    assert body["error"] == "overloaded", body
    for needle in needles:
        assert needle in body["detail"], (needle, body)


def test_full_queue_is_503_with_retry_after_then_recovers(apps: Apps) -> None:
    url = f"{apps.admit_url}/v1/models/tiny/predict{VALID_QUERY}"
    good = phantom_bytes()
    uploads = [_SlowUpload(good), _SlowUpload(good)]
    with ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(_post_slow, url, u) for u in uploads]
        try:
            _wait_admitted(apps, 2)
            _assert_busy(httpx.post(url, content=good, timeout=TIMEOUT), "queue full")
        finally:
            for u in uploads:
                u.release.set()
        assert [p.result().status_code for p in pending] == [200, 200]
    assert httpx.post(url, content=good, timeout=TIMEOUT).status_code == 200
    assert replica_status(apps.admit_url)["admission"] == {
        "requests": 0, "max_requests": 2, "bytes": 0, "max_bytes": 40 * 2**20,
        "retry_after_s": replica_status(apps.admit_url)["admission"]["retry_after_s"],
    }  # fmt: skip


def test_memory_budget_is_503_now_or_413_never(apps: Apps) -> None:
    url = f"{apps.admit_url}/v1/models/tiny/predict{VALID_QUERY}"
    hog = _SlowUpload(bytes(30 * 2**20))  # declares 30 of the 40 MiB
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(_post_slow, url, hog)
        try:
            status = _wait_admitted(apps, 1)
            assert status["admission"]["bytes"] >= 30 * 2**20
            _assert_busy(
                httpx.post(url, content=bytes(12 * 2**20), timeout=TIMEOUT), "MiB are free"
            )
        finally:
            hog.release.set()
        r = pending.result()
        assert r.status_code == 422 and r.json()["error"] == "invalid_nifti"
    # a volume whose inference alone needs more than the whole budget: no retry can help
    array = np.random.default_rng(0).normal(0, 300, (85, 85, 40)).astype(np.int16)
    big = nib.Nifti1Image(array, np.diag([8.0, 8.0, 8.0, 1.0]))
    r = httpx.post(url, content=_gz(big.to_bytes()), timeout=TIMEOUT)
    assert r.status_code == 413, (r.status_code, r.headers["content-type"])
    assert r.json()["error"] == "volume_too_large", r.json()
    assert "--memory-budget-mb" in r.json()["detail"]
    assert replica_status(apps.admit_url)["admission"]["bytes"] == 0


def test_lone_request_does_not_wait_for_a_batch(apps: Apps) -> None:
    """The admit app waits up to 5 s for batch mates, but only for requests already arriving:
    a lone request is dispatched at once (Serve's @serve.batch held it the full 5 s)."""
    url = f"{apps.admit_url}/v1/models/tiny/predict{VALID_QUERY}"
    body = phantom_bytes()
    httpx.post(url, content=body, timeout=TIMEOUT).raise_for_status()  # warm
    t = time.perf_counter()
    r = httpx.post(url, content=body, timeout=TIMEOUT)
    seconds = time.perf_counter() - t
    assert r.status_code == 200 and r.headers["x-ctray-batch-size"] == "1"
    assert seconds < 2.5, f"a lone request took {seconds:.2f} s: it waited for a batch"


def test_fuzz_cases_are_reproducible() -> None:
    """The same seed gives the same cases, so a failing case index reproduces."""
    a = [(i, label, hash(body), q) for i, label, body, q in fuzz_cases(40)]
    b = [(i, label, hash(body), q) for i, label, body, q in fuzz_cases(40)]
    assert a == b and len({label.split()[0] for _, label, _, _ in a}) >= 6
