"""What made a run's numbers: the code's commit, the date, the machine. Recorded in every
run's ``metrics.json`` (``provenance``) and stated in each results folder's README.md."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def commit(root: Path = ROOT) -> str:
    """The checkout's commit, ``+dirty`` when tracked files differ from it; ``unknown``
    outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str | None = None) -> dict[str, Any]:
    """The CPU, its core count, the accelerator (when ``device`` is one), torch's version
    and threads."""
    import torch

    out: dict[str, Any] = {"cpu": cpu_name(), "cpu_cores": os.cpu_count(),
                           "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device and device.startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return out


def provenance(device: str | None = None) -> dict[str, Any]:
    return {"commit": commit(), "date": datetime.datetime.now(datetime.timezone.utc)
            .strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(device)}


def command_line() -> str:
    """The running script's command line, as it was typed (``python scripts/x.py --a b``)."""
    return shlex.join(["python", *sys.argv])
