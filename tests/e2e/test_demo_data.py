"""demo data: the CLI, the presets, the embedded demo (the unit checks: tests.unit.test_demo_data)."""

from __future__ import annotations
import os
import subprocess
import sys
from tests.unit.test_demo_data import _DIGEST  # noqa: E402


def test_output_does_not_depend_on_hash_randomization():
    digests = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        out = subprocess.run([sys.executable, "-c", _DIGEST], env=env, check=True,
                             capture_output=True, text=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1
