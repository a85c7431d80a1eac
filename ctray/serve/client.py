"""A small HTTP client for a running `ctray serve` (httpx only: no Ray, no torch, unless a
DICOM series is sent: it is converted to NIfTI here, with ctray.data, before the upload).

client = CtrayClient("http://127.0.0.1:8000", token=os.environ.get("CTRAY_SERVE_TOKEN"))
client.predict_file("ct.nii.gz", "venous.nii.gz", "phase_gan_best", target_phase="venous")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from ctray.files import atomic_write_bytes


class ServeError(RuntimeError):
    """The server answered with an error (status >= 400), or could not be reached (status 0)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status = status
        self.message = message


class CtrayClient:
    """Calls the routes of docs/serving.md; every error becomes a ServeError with the reason."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 300.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CtrayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/healthz").json()

    def models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/models").json()

    def predict(self, data: str | os.PathLike | bytes, model: str, **conditioning: Any) -> bytes:
        """Send a volume: a .nii/.nii.gz (path or bytes), or a DICOM series folder or .zip
        (converted to NIfTI locally, so its errors are reported before any upload); returns
        the prediction as .nii.gz bytes, on the grid of the volume sent."""
        body = data if isinstance(data, bytes) else _volume_bytes(Path(data))
        response = self._call(
            "POST",
            f"/v1/models/{quote(model, safe='')}/predict",
            params={k: str(v) for k, v in conditioning.items()},
            content=body,
            headers={"Content-Type": "application/octet-stream"},
        )
        return response.content

    def predict_views(
        self, views: list[str | os.PathLike | bytes], model: str, **conditioning: Any
    ) -> bytes:
        """Send X-ray views (paths or bytes, in the order the model lists) as multipart
        ``views`` files; returns the predicted CT as .nii.gz bytes."""
        files = []
        for i, view in enumerate(views):
            if isinstance(view, bytes):
                files.append(("views", (f"view{i}", view, "application/octet-stream")))
            else:
                path = Path(view)
                files.append(("views", (path.name, path.read_bytes(), "application/octet-stream")))
        response = self._call(
            "POST",
            f"/v1/models/{quote(model, safe='')}/predict",
            params={k: str(v) for k, v in conditioning.items()},
            files=files,
        )
        return response.content

    def predict_file(
        self,
        in_path: str | os.PathLike | list[str | os.PathLike],
        out_path: str | os.PathLike,
        model: str,
        **conditioning: Any,
    ) -> Path:
        """Predict ``in_path`` (a volume, or a list of view files) and write the result
        atomically to ``out_path`` (.nii.gz)."""
        if isinstance(in_path, list):
            data = self.predict_views(in_path, model, **conditioning)
        else:
            data = self.predict(in_path, model, **conditioning)
        return atomic_write_bytes(out_path, data)

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kw)
        except httpx.TimeoutException as err:
            raise ServeError(0, f"{self.url}: no answer in time ({err!r})") from err
        except httpx.HTTPError as err:
            raise ServeError(0, f"cannot reach {self.url}: {err}") from err
        if response.status_code >= 400:
            raise ServeError(response.status_code, _message(response))
        return response


def _volume_bytes(path: Path) -> bytes:
    if path.is_dir() or path.name.lower().endswith(".zip"):
        from ctray.data.volumes import series_nifti_bytes

        return series_nifti_bytes(path)
    return path.read_bytes()


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return f"{body['error']}: {body['detail']}"
    except Exception:
        text = response.text.strip()
        return text[:500] if text else response.reason_phrase
