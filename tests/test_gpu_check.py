"""The GPU check (workflows/gpu_check.py, run as python -m benchmarks.gpu_check) cannot rot: its --smoke
run (tiny sizes, CPU) goes through every section."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_writes_every_section(tmp_path):
    out = tmp_path / "gpu.md"
    proc = subprocess.run([sys.executable, "-m", "workflows.gpu_check", "--smoke", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for heading in ("## 1. Training step", "## 2. Stage 2 on the device", "## 3. Host syncs", "## 4. LAMB step",
                    "## 5. Peak memory"):
        assert heading in text, heading
    assert text.count("| ours (engine) |") == 3 and text.count("| timm peer |") == 3  # 2 eager res + 1 compiled
    assert "command: `python -m benchmarks.gpu_check --smoke" in text and "Ours / timm:" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the no-GPU message cannot be shown")
def test_gpu_check_without_a_gpu_says_so_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "workflows.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: no CUDA device; run with --smoke for the CPU dry run"
