"""The README's example of wrapping a user's CNN runs as written, and is the file it shows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_shows_the_example_file():
    example = (ROOT / "examples" / "wrap_your_cnn.py").read_text()
    assert example.strip() in (ROOT / "README.md").read_text()


def test_wrap_your_cnn_trains(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "wrap_your_cnn.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    final = json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"'))
    assert final["test_accuracy"] > 50, final  # 10 digits: chance is 10%
    assert (tmp_path / "runs" / "wrap_example").is_dir()
