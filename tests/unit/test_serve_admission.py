"""Admission control, the adaptive batcher and the memory estimates of ctray.serve (no Ray)."""

from __future__ import annotations

import asyncio
import gzip
import time

import nibabel as nib
import numpy as np
import pytest

from ctray.data.nifti import nifti_bytes
from ctray.registry import DataInfo, family_names, get_family
from ctray.serve.admission import (
    DECODE_BYTES_PER_VOXEL,
    Admission,
    decode_bytes,
    inference_bytes,
    working_voxels,
)
from ctray.serve.batching import AdaptiveBatcher
from ctray.serve.errors import ApiError
from ctray.serve.handling import check_working_size, decode_volume, parse_conditioning

MODEL = DataInfo(patch_size=(16, 16, 16), spacing=(8.0, 8.0, 8.0), window={"lo": -1, "hi": 1})


def _refused(fn, *args, **kw) -> ApiError:
    with pytest.raises(ApiError) as err:
        fn(*args, **kw)
    return err.value


# --------------------------------------------------------------------------- admission


def test_queue_length_is_bounded_with_a_503_and_retry_after() -> None:
    admission = Admission(max_requests=2, max_bytes=1000)
    with admission.enter(), admission.enter() as second:
        err = _refused(admission.enter)
        assert (err.status, err.error) == (503, "overloaded") and "queue full" in err.detail
        assert err.headers() == {"Retry-After": str(err.retry_after_s)} and err.retry_after_s >= 1
        assert admission.arriving() == 2
        second.queued()
        assert admission.arriving() == 1
    with admission.enter():  # slots come back when requests end, however they end
        pass
    assert admission.snapshot()["requests"] == 0


def test_byte_budget_refuses_now_503_or_never_413() -> None:
    admission = Admission(max_requests=4, max_bytes=1000)
    with admission.enter() as a:
        a.hold("body", 700, what="the upload")
        with admission.enter() as b:
            err = _refused(b.hold, "decode", 400, what="the 10x10x10 volume")
            assert err.status == 503 and "the 10x10x10 volume" in err.detail
            assert "MiB are free" in err.detail
            b.hold("decode", 300, what="x")  # exactly the rest fits
            assert admission.snapshot()["bytes"] == 1000
        assert admission.snapshot()["bytes"] == 700  # b's bytes came back with b
        a.hold("body", 0, what="the upload")  # shrinking never fails
        err = _refused(a.hold, "inference", 1001, what="the big volume")
        assert (err.status, err.error) == (413, "volume_too_large")
        assert "--memory-budget-mb" in err.detail
        assert _refused(a.hold, "body", 2000, what="the upload").error == "body_too_large"
    assert admission.snapshot()["bytes"] == 0


def test_retry_after_follows_how_long_requests_take() -> None:
    admission = Admission(max_requests=1, max_bytes=10)
    assert admission.retry_after_s() == 1
    ticket = admission.enter()
    ticket.started -= 30.0  # a request that took 30 s
    ticket.__exit__(None, None, None)
    assert 5 <= admission.retry_after_s() <= 60


# --------------------------------------------------------------------------- estimates


def test_working_grid_follows_the_header_spacing_and_orientation() -> None:
    assert working_voxels(MODEL, (32, 32, 32), np.diag([8.0, 8.0, 8.0, 1.0])) == 32**3
    # 100^3 voxels of 100 mm: a small upload, a 1250^3 grid at 8 mm
    assert working_voxels(MODEL, (100, 100, 100), np.diag([100.0] * 3 + [1.0])) == 1250**3
    # anisotropic model spacing: each voxel axis is matched to the world axis it becomes
    model = DataInfo(patch_size=(16, 16, 16), spacing=(1.0, 1.0, 4.0), window={"lo": 0, "hi": 1})
    permuted = np.array([[0, 0, 2.0, 0], [2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 1]])
    assert working_voxels(model, (10, 20, 30), permuted) == 5 * 40 * 60
    slices = DataInfo(
        patch_size=(64, 64, 1), spacing=(1, 1, 1), window={"lo": 0, "hi": 1}, resize_inplane=True
    )
    assert working_voxels(slices, (512, 512, 30), np.eye(4)) == 64 * 64 * 512


def test_inference_estimate_grows_with_output_scale_and_working_grid() -> None:
    same = inference_bytes(MODEL, (32, 32, 32), np.diag([8.0, 8.0, 8.0, 1.0]))
    coarse = inference_bytes(MODEL, (32, 32, 32), np.diag([16.0, 16.0, 16.0, 1.0]))
    refined = DataInfo(
        patch_size=(16, 16, 16),
        spacing=(8, 8, 8),
        window={"lo": 0, "hi": 1},
        output_scale=(1, 1, 5),
    )
    assert coarse > same > 32**3 * 64
    assert inference_bytes(refined, (32, 32, 32), np.diag([8.0, 8.0, 8.0, 1.0])) > 3 * same
    assert decode_bytes((10, 20, 30)) == DECODE_BYTES_PER_VOXEL * 6000


def test_working_grid_over_the_limit_is_413_with_the_reason() -> None:
    affine = np.diag([100.0, 100.0, 100.0, 1.0])
    err = _refused(check_working_size, MODEL, (100, 100, 100), affine, 4_000_000)
    assert err.status == 413 and "1,953,125,000" in err.detail and "pixdim" in err.detail
    check_working_size(MODEL, (100, 100, 100), np.diag([8.0, 8.0, 8.0, 1.0]), 4_000_000)


def test_decode_reserves_before_allocating() -> None:
    """on_header runs with the header's shape before any voxel is read; refusing there stops
    the decode (a header claiming 10^9 voxels in a 1 KB upload allocates nothing)."""
    seen = []
    vol = decode_volume(
        nifti_bytes(np.arange(512.0).reshape(8, 8, 8), np.eye(4)),
        max_voxels=10**6,
        on_header=seen.append,
    )
    assert seen == [(8, 8, 8)] and vol.shape == (8, 8, 8)
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1000, 1000, 900))
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    body = gzip.compress(hdr.binaryblock + b"\x00" * 1024)

    def refuse(shape: tuple[int, int, int]) -> None:
        raise ApiError("overloaded", f"no room for {shape}", retry_after_s=1)

    assert _refused(decode_volume, body, max_voxels=10**10, on_header=refuse).status == 503


# --------------------------------------------------------------------------- batcher


def _batcher(wait_s: float, arriving=lambda: 0, max_batch_size: int = 4):
    calls: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        calls.append(items)
        await asyncio.sleep(0.05)
        return [10 * i for i in items]

    return AdaptiveBatcher(
        run, max_batch_size=max_batch_size, wait_s=wait_s, arriving=arriving
    ), calls


def test_a_lone_request_is_dispatched_at_once() -> None:
    """Nothing else arriving: no wait for a batch that never comes (Serve's @serve.batch
    held every lone request for its whole batch_wait_timeout_s)."""

    async def main() -> float:
        batcher, calls = _batcher(wait_s=5.0)
        t = time.perf_counter()
        assert await batcher.submit(3) == 30
        assert calls == [[3]]
        return time.perf_counter() - t

    assert asyncio.run(main()) < 1.0


def test_requests_queued_while_the_model_works_go_together() -> None:
    async def main() -> list[list[int]]:
        batcher, calls = _batcher(wait_s=0.0, max_batch_size=3)
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)  # the model is busy with it when the others come
        results = await asyncio.gather(first, *(batcher.submit(i) for i in range(1, 7)))
        assert results == [10 * i for i in range(7)]
        return calls

    # the first request finds the model free and runs alone; the rest pile up meanwhile
    assert asyncio.run(main()) == [[0], [1, 2, 3], [4, 5, 6]]


def test_the_free_model_waits_only_for_requests_already_arriving() -> None:
    async def main() -> tuple[list[list[int]], float]:
        arriving = [1]
        batcher, calls = _batcher(wait_s=2.0, arriving=lambda: arriving[0])

        async def late() -> int:
            await asyncio.sleep(0.1)  # still decoding, then joins
            arriving[0] = 0
            return await batcher.submit(2)

        t = time.perf_counter()
        await asyncio.gather(batcher.submit(1), late())
        return calls, time.perf_counter() - t

    calls, seconds = asyncio.run(main())
    assert calls == [[1, 2]] and seconds < 1.0  # it did not wait the full 2 s


def test_a_failed_batch_fails_its_requests_and_the_batcher_goes_on() -> None:
    async def main() -> None:
        calls = []

        async def run(items: list[int]) -> list[int]:
            calls.append(items)
            if 0 in items:
                raise RuntimeError("boom")
            return items

        batcher = AdaptiveBatcher(run, max_batch_size=2)
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(0)
        assert await batcher.submit(5) == 5

    asyncio.run(main())


# --------------------------------------------------------------------------- conditioning

HOSTILE_VALUES = ["", " ", "nan", "inf", "-inf", "1e309", "-1", "0", "65", "1.5", "0x10",
                  "9" * 400, "\x00", "\U0001f4a9", "venous\x00", "auto", "None", "[]"]  # fmt: skip


@pytest.mark.parametrize("family", family_names())
def test_hostile_conditioning_is_a_422_or_parsed(family: str) -> None:
    """Every family's query parsing, with hostile strings for every key it knows and the
    usual suspects (steps, temperature): parsed, or a 422 with a reason; nothing else."""
    spec = get_family(family)
    keys = [*spec.conditioning, "steps", "temperature", "target_phase", "\u00e9"]
    for key in keys:
        for value in HOSTILE_VALUES:
            base = [(k, "venous") for k in spec.conditioning if k == "target_phase" and k != key]
            try:
                parse_conditioning(spec, [*base, (key, value)])
            except ApiError as err:
                assert err.status == 422 and len(err.detail) > 10, (key, value, err)
