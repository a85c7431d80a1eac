"""What every benchmark prints about its run: machine, load, and its section of the results doc.

The benchmarks are scripts (``python benchmarks/bench_*.py``); their folder is on ``sys.path``
when they run, so they import this module by its bare name.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"


def load_average() -> str:
    """The 1-minute load average, as printed beside every result (the machine may be shared)."""
    return f"{os.getloadavg()[0]:.1f}"


def machine(*packages: str) -> str:
    """Architecture, cores, memory, Python and the versions of ``packages`` (imported here)."""
    gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = []
    for name in packages:
        module = __import__(name)
        versions.append(f"{name} {module.__version__}")
    return ", ".join(
        [
            platform.machine(),
            f"nproc={os.cpu_count()}",
            f"{gib:.0f} GiB RAM",
            f"Python {platform.python_version()}",
            *versions,
        ]
    )


def load_note(start: str, end: str) -> str:
    """Whether the load average says the figures can be quoted as they are."""
    nproc = os.cpu_count() or 1
    peak = max(float(start), float(end))
    if peak > nproc:
        return (
            f"load average (1 min) {start} at start, {end} at end, above nproc={nproc}: the "
            "machine was shared, so absolute rates are low and ratios noisy; rerun on an idle "
            "machine before quoting them"
        )
    return (
        f"load average (1 min) {start} at start, {end} at end, at most nproc={nproc}: the "
        "machine was close to idle"
    )


def write_doc(path: Path, heading: str, section: str) -> None:
    """Replace (or append) the ``heading`` section of ``path``, leaving the rest alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    block = section.rstrip() + "\n\n"
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n")


def tree_cpu_seconds(root: int | None = None) -> float:
    """CPU seconds (user + system) a process and all its descendants have used so far.

    Linux ``/proc``: a Ray session started by ``ray.init`` is the driver's process tree (GCS,
    raylet, dashboard, workers), so this counts everything the session burns, idle daemons
    included; descendants that exited count through their parents' ``cutime``/``cstime``.
    CPU seconds depend much less than wall seconds on how many other jobs share the machine
    (contention still inflates them somewhat: caches, shared cores).
    """
    ticks = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    used: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # Fields after the command name (which may hold spaces): state ppid ... utime stime
        # cutime cstime at offsets 11-14.
        fields = text[text.rindex(")") + 2 :].split()
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        used[pid] = sum(int(v) for v in fields[11:15])
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0, [root or os.getpid()]
    while stack:
        pid = stack.pop()
        total += used.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total / ticks


def stop_ray() -> None:
    """Shut the benchmark's Ray session down (if up) and flush its late stderr lines, so none
    follows the RESULT line."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    sys.stderr.flush()
