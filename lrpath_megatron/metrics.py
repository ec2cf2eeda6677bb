"""Training metrics: one JSON line per logged step in ``metrics.jsonl`` (every ``logging.log_interval``
steps, at evaluations and at the path's end), the same as TensorBoard scalars, a concise stdout line.

Only rank 0 writes. On resume at step k, lines for steps >= k (written before a crash, after the last
checkpoint) are dropped so the file always describes one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from lrpath_megatron.run_layout import PathDirs

# Dense bf16 tensor-core peak per GPU, by a substring of torch's device name (first match wins, so
# the PCIe/NVL variants come before the plain name). MFU is reported only against a known peak.
BF16_PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("H800", 989e12), ("A100", 312e12), ("A800", 312e12))


def peak_flops(device_name: str | None, dtype: str, configured_tflops: float | None = None) -> float | None:
    """Per-GPU peak FLOP/s for MFU: ``logging.peak_tflops`` when set, else the table's peak for a bf16
    run on a GPU it names; None (no MFU) on CPU, in fp32 or on an unknown GPU."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if device_name is None or dtype != "bf16":
        return None
    return next((peak for name, peak in BF16_PEAK_FLOPS if name in device_name), None)


class MetricsLogger:
    def __init__(self, dirs: PathDirs, enabled: bool, tensorboard: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = dirs.metrics
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(dirs.tensorboard), purge_step=resume_step)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", -1) < step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any], echo: bool = True) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        step = record["step"]
        if self._tb is not None:
            for key, value in _flatten(record).items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if echo:
            print(format_line(record), flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def format_line(record: dict[str, Any]) -> str:
    parts = [f"{record.get('path', '')} step {record['step']}"]
    for key, fmt in (("loss", ".4f"), ("val_loss", ".4f"), ("lr", ".3e"), ("grad_norm", ".3f"),
                     ("tokens_per_s", ".0f"), ("mfu", ".1%")):
        if key in record and record[key] is not None:
            parts.append(f"{key} {format(record[key], fmt)}")
    if record.get("stage"):
        parts.append(f"stage {record['stage']}")
    if record.get("events"):
        parts.append("; ".join(record["events"]))
    return " | ".join(parts)


def _flatten(record: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def read_metrics(dirs: PathDirs) -> list[dict]:
    path = dirs.metrics
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
