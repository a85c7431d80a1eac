"""``ctray-run.json``: what ctray knows about a tune run that Tune's own files do not say.

Tune records trials, configs and results; the report also needs the family and stage, the
settings and resources the search ran with, the shard folder, the Optuna study, the export and
the wall time. The record sits beside Tune's files in the run folder (or, for a remote
``--storage``, in the export folder), so ``ctray report DIR`` can rebuild the report from the
folder alone. It holds no password: an RDB URL is stored redacted.
"""

from __future__ import annotations

import json
import platform
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ctray.files import atomic_write_bytes

RECORD = "ctray-run.json"
FORMAT = "ctray-run/1"


def read_record(directory: str | Path) -> dict[str, Any]:
    """The record in ``directory``; a folder without one says what it expected."""
    path = Path(directory) / RECORD
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory}: no {RECORD}; give the run folder of a ctray tune run "
            "(<storage>/<experiment>, e.g. runs/phase_gan-20261123-140000; for a remote "
            "--storage, the run's export folder)"
        )
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported run record format {record.get('format')!r}")
    return record


def write_record(directory: str | Path, record: dict[str, Any]) -> Path:
    return atomic_write_bytes(
        Path(directory) / RECORD, json.dumps({"format": FORMAT, **record}, indent=2).encode()
    )


def local_run_dir(storage: str, run_name: str) -> Path | None:
    """The run folder of a local ``--storage``; None for a remote one (s3://...)."""
    return None if "://" in storage else Path(storage).expanduser().resolve() / run_name


def begin_record(run_dir: Path | None, *, resume: bool, **fields: Any) -> dict[str, Any]:
    """The record of a run at the start of this session, written to ``run_dir`` (if local).

    A resumed run keeps its record (its settings and study do not change); a new one starts
    from ``fields``.
    """
    if resume and run_dir is not None and (run_dir / RECORD).is_file():
        record = start_session(read_record(run_dir))
    else:
        record = start_session(fields)
    if run_dir is not None:
        write_record(run_dir, record)
    return record


def start_session(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with a new session (this invocation: a first run or a --resume) appended."""
    session = {
        "started": time.time(),
        "wall_time_s": None,
        "host": socket.gethostname(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
    }
    return {**record, "sessions": [*record.get("sessions", []), session]}


def finish_session(record: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """``record`` with the current session's wall time, software versions and ``fields``."""
    import optuna
    import ray
    import torch

    from ctray import __version__

    sessions = [dict(s) for s in record.get("sessions", [])]
    if sessions:
        sessions[-1]["wall_time_s"] = time.time() - sessions[-1]["started"]
    versions = {
        "ctray": __version__,
        "python": platform.python_version(),
        "ray": ray.__version__,
        "torch": torch.__version__,
        "optuna": optuna.__version__,
    }
    resources = ray.cluster_resources() if ray.is_initialized() else {}
    # Totals only: no per-node keys, no placement-group bookkeeping (CPU_group_..., bundle_...).
    cluster = {k: float(v) for k, v in resources.items() if "node:" not in k and "_group_" not in k}
    return {**record, **fields, "sessions": sessions, "versions": versions, "cluster": cluster}
