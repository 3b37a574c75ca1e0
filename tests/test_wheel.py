"""An installed wheel (not the checkout) carries the default policies, templates, schema and demo zoo."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_installs_with_its_data(tmp_path: Path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(REPO)], check=True, capture_output=True, timeout=600)
    wheel = next(dist.glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "gatekeeper/_data/policies/default.yaml",
        "gatekeeper/_data/policies/tiny-world.yaml",
        "gatekeeper/_data/templates/report.md.j2",
        "gatekeeper/_data/schemas/result.schema.json",
        "gatekeeper/_data/schemas/policy.schema.json",
        "gatekeeper/_data/zoo/demo/clean/gatekeeper.json",
        "gatekeeper/_data/zoo/demo/backdoored/backbone/open_clip_model.safetensors",
        "gatekeeper/_data/zoo/backbone/open_clip_model.safetensors",
    ):
        assert needed in names, needed
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    # the light dependencies come from the same index/cache; torch is not needed for this check
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel), "pyyaml", "jinja2", "markupsafe"], check=True, timeout=600)
    code = (
        "import gatekeeper, pathlib;"
        "from gatekeeper.policy import load_policy;"
        "from gatekeeper.resources import data_path;"
        "assert 'site-packages' in str(data_path('policies')), data_path('policies');"
        "assert load_policy('default').k == 2.0 and load_policy('tiny-world');"
        "from gatekeeper.report.jsonout import load_schema; assert load_schema()['title'];"
        "assert (data_path('templates') / 'report.md.j2').is_file();"
        "print('ok', data_path('policies'))"
    )
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout
