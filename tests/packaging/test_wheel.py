"""The wheel carries data/: a non-editable install finds the catalogue outside the checkout."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_ships_catalogue(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(dist)], check=True, timeout=300)
    wheel = next(dist.glob("nvfree-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "estimator/data/devices.toml" in names and "estimator/data/models.toml" in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, timeout=300)
    code = ("import estimator, estimator.catalog as c; "
            f"assert estimator.__file__.startswith({str(target)!r}), estimator.__file__; "
            f"assert c.data_dir().is_relative_to({str(target)!r}); "
            "print(len(c.list_devices()), len(c.list_models()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=60,
                         capture_output=True, text=True, env={"PYTHONPATH": str(target)})
    num_devices, num_models = map(int, out.stdout.split())
    assert num_devices >= 40 and num_models >= 16
