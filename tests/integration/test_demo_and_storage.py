"""The main job (`make demo`) and s3:// loading against a real HTTP S3 endpoint."""

import pytest

from convllava.quickstart import run_quickstart

pytestmark = pytest.mark.integration


def test_demo_learns_to_name_every_real_photo(tmp_path, capsys):
    assert run_quickstart(tmp_path, steps=120) == 0
    out = capsys.readouterr().out
    assert "8/8 photos named correctly" in out
    losses = [float(line.split("loss ")[1].split()[0]) for line in out.splitlines() if line.startswith("step ")]
    assert losses[-1] < 0.2 * losses[0]
    assert (tmp_path / "model" / "model.safetensors").is_file()
