"""Each leaf runs when copied alone into an empty folder: readers lift single files, so none may need the repository.

Every test copies one file into a fresh tmp folder and runs its demo or CLI there as a subprocess, with that folder
as the working directory, PYTHONPATH removed and one thread.
"""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def run_alone(tmp_path: Path, name: str, *args: str) -> subprocess.CompletedProcess:
    """Copy ROOT/name into tmp_path (holding nothing else of the repository) and run `python name args` there."""
    shutil.copy(ROOT / name, tmp_path / name)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # one thread each; a private cache dir, so a stray download attempt would show up in tmp_path
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", XDG_CACHE_HOME=str(tmp_path / "xdg_cache"))
    result = subprocess.run([sys.executable, name, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("name, allowed", [("attacks.py", set()), ("unet.py", set()), ("data.py", set()),
                                           ("eval_fid.py", {"data"})])
def test_leaves_import_nothing_from_the_repository(name, allowed):
    """No import statement, at top level or inside a function, names another file of the repository; the one
    exception is eval_fid.py's lazy `import data`, used only for the `cifar10` reference statistics."""
    repo_modules = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if p.is_dir()}
    imported = set()
    for node in ast.walk(ast.parse((ROOT / name).read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." if node.level else node.module.split(".")[0])
    assert (imported & repo_modules) - allowed == set() and "." not in imported


def test_attacks_demo_alone(tmp_path):
    """`python attacks.py` alone: PGD on the distance to a fixed point reaches the l2 ball's boundary and raises
    the loss. Radius r = 0.1 sqrt(3 * 8 * 8) = 0.1 sqrt(192) = 1.3856 (closed form)."""
    out = run_alone(tmp_path, "attacks.py").stdout
    assert "radius 1.3856" in out
    norms = [float(v) for v in out.split("[")[1].split("]")[0].split(",")]
    assert norms == pytest.approx([1.3856406] * 4, rel=1e-5)
    before, after = (float(out.split(key)[1].split()[0]) for key in ("loss before", "after PGD"))
    assert after > before


def test_unet_demo_alone(tmp_path):
    """`python unet.py` alone builds the presets it is given and runs one forward; the cifar10 preset has ADM's
    CIFAR-10 size with resblock_updown and learned variance, 57,094,662 parameters (closed form in
    tests/test_unet.py). The 64x64 ImageNet preset (121M parameters) is left out to keep the test short."""
    out = run_alone(tmp_path, "unet.py", "--device", "cpu", "--preset", "cifar10", "tiny-iddpm", "mlp2d").stdout
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert set(lines) == {"cifar10", "tiny-iddpm", "mlp2d"}
    assert "-> (2, 6, 32, 32)" in lines["tiny-iddpm"]
    assert "57,094,662 (learn_sigma)" in lines["cifar10"] and "-> (2, 6, 32, 32)" in lines["cifar10"]
    assert "-> (2, 4)" in lines["mlp2d"]


def test_eval_fid_cli_alone(tmp_path):
    """`python eval_fid.py a.npz b.npz` alone, on two saved (mu, sigma) files: no network and no weights needed.
    Hand computation: mu (0, 0) vs (1, 0), Sigma I vs diag(4, 1): |d mu|^2 = 1, tr = 2 + 5,
    tr((Sigma1 Sigma2)^(1/2)) = tr diag(2, 1) = 3, so FID = 1 + 7 - 2 * 3 = 2."""
    np.savez(tmp_path / "a.npz", mu=np.zeros(2), sigma=np.eye(2))
    np.savez(tmp_path / "b.npz", mu=np.array([1.0, 0.0]), sigma=np.diag([4.0, 1.0]))
    result = run_alone(tmp_path, "eval_fid.py", "a.npz", "b.npz", "--device", "cpu")
    assert float(result.stdout.split("FID:")[1]) == pytest.approx(2.0, abs=1e-9)
    assert not (tmp_path / "xdg_cache").exists()  # the Inception weights were neither looked for nor downloaded


def test_data_cli_alone(tmp_path):
    """`python data.py --dataset shapes --out grid.png --num 16` alone writes a 4 x 4 grid of 32x32 images with
    2 px padding: 4 * (32 + 2) + 2 = 138 px a side."""
    out = run_alone(tmp_path, "data.py", "--dataset", "shapes", "--out", "grid.png", "--num", "16").stdout
    assert "wrote 16 images to grid.png" in out
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size == (138, 138)
