"""The README's usage example runs as written (docs that cannot rot silently)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["heatmaps"].shape == (4, 2000, 7, 7)
    assert torch.isfinite(scope["loss"]) and torch.isfinite(scope["mean_loss"])
    assert scope["x"].grad is not None and scope["prototypes"].grad.abs().sum() > 0
