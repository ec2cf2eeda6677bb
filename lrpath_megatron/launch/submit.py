"""Submit the rendered jobs: run the generated ``submit.sh`` (exactly what an admin can read and run)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from lrpath_megatron.errors import LrpathError


def submit(out_dir: Path, env: dict | None = None) -> dict[str, str]:
    """Run ``OUT/submit.sh``; returns {job key: SLURM job id} ("main@40": "123", "v1": "125", ...)."""
    script = Path(out_dir) / "submit.sh"
    if not script.is_file():
        raise LrpathError(f"{script} does not exist; render the scripts first (lrpath launch ... --slurm)")
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                          env=dict(os.environ) if env is None else env)
    if proc.returncode != 0:
        raise LrpathError(
            f"{script} failed (exit {proc.returncode}); jobs it had submitted were cancelled.\n"
            f"{proc.stderr.strip() or proc.stdout.strip()}"
        )
    ids = dict(line.split(maxsplit=1) for line in proc.stdout.splitlines() if line.strip())
    (Path(out_dir) / "submitted.txt").write_text(proc.stdout)
    return ids
