"""One class of fault per test: every bad input, mismatched checkpoint, failed write or planted file ends in one
`error:` line on stderr and exit code 1, with no traceback, and leaves the files already on disk byte-identical.

The commands run in-process through each script's cli(argv) (a subprocess costs seconds of imports); two run as real
subprocesses, to check the __main__ path end to end.
"""
import builtins
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cm_at
import dpm_at
import unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import robustness  # noqa: E402

# a 1-step shapes run that takes a second on a CPU: 16 images, batch 2, a 2-image grid of 2 DDPM ancestral
# (fixed_small) steps
QUICK = ["--tiny", "--num-shapes", "16", "--batch-size", "2", "--num-grid", "2", "--grid-steps", "2", "--device", "cpu"]


def snapshot(folder) -> dict:
    """name -> bytes of every file under folder (empty if it does not exist)."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                out[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return out


def assert_refused(rc: int, capsys, expect: str) -> str:
    """Exit code 1, one line on stderr that starts with `error:` and says `expect`, no traceback (the progress bar
    of a run that stopped, also on stderr, is not counted)."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines()
             if line.strip() and not line.endswith(("it/s]", "s/it]"))]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error:"), err
    assert expect in lines[0] and "Traceback" not in err and "weights_only" not in err, lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 1-step dpm_at.py run (ckpt.pt, args.json, grid) to resume, mismatch and break."""
    out = tmp_path_factory.mktemp("faults") / "run"
    assert dpm_at.cli([*QUICK, "--steps", "1", "--out", str(out)]) == 0
    return out


BAD_DPM = [("--lr", "-1", "--lr must be > 0"), ("--lr", "nan", "--lr must be > 0"),
           ("--dropout", "1.5", "--dropout must be in [0, 1)"), ("--ema-decay", "2", "--ema-decay must be in [0, 1)"),
           ("--adv-budget", "-1", "--adv-budget must be >= 0"), ("--num-shapes", "0", "--num-shapes must be >= 1"),
           ("--steps", "0", "--steps must be >= 1"), ("--at-start", "-1", "--at-start must be >= 0"),
           ("--adv-steps", "-2", "--adv-steps must be >= 0"),
           ("--adv-step-size", "-0.1", "--adv-step-size must be >= 0"),
           ("--seed", "-1", "--seed must be in"), ("--threads", "0", "--threads must be >= 1"),
           ("--grid-seconds", "-5", "--grid-seconds must be >= 0"), ("--grid-steps", "1001", "--grid-steps must lie"),
           ("--diffusion-steps", "1", "--diffusion-steps must be >= 2"), ("--image-size", "4", "--image-size must be"),
           ("--input-perturbation", "-0.1", "--input-perturbation must be >= 0"),
           ("--batch-size", "0", "--batch-size must be >= 1"), ("--device", "tpu9", "--device tpu9")]


@pytest.mark.parametrize("flag,value,expect", BAD_DPM)
def test_dpm_bad_flag_values(tmp_path, capsys, flag, value, expect):
    """Every numeric flag of dpm_at.py is range-checked before anything is written: no run folder is left."""
    rc = dpm_at.cli([*QUICK, flag, value, "--out", str(tmp_path / "r")])
    assert_refused(rc, capsys, expect)
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu(tmp_path, capsys):
    """--device cuda on a machine without a GPU says so and how to go on, instead of failing deep in PyTorch."""
    assert_refused(dpm_at.cli([*QUICK, "--device", "cuda", "--out", str(tmp_path / "r")]), capsys, "--device cpu")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag,value,expect", [
    ("--lr", "-1", "--lr must be > 0"), ("--ema-decay", "1", "--ema-decay must be in [0, 1)"),
    ("--target-decay", "1.5", "--target-decay must be in [0, 1)"), ("--num-scales", "1", "--num-scales must be >= 2"),
    ("--dropout", "-0.1", "--dropout must be in [0, 1)"), ("--adv-budget", "-1", "--adv-budget must be >= 0"),
    ("--steps", "0", "--steps must be >= 1")])
def test_cm_bad_flag_values(run, tmp_path, capsys, flag, value, expect):
    """Every numeric flag of cm_at.py is range-checked before anything is written: no run folder is left."""
    rc = cm_at.cli(["--teacher", str(run / "ckpt.pt"), "--tiny", flag, value, "--out", str(tmp_path / "r")])
    assert_refused(rc, capsys, expect)
    assert not (tmp_path / "r").exists()


def test_cli_subprocess_one_line(tmp_path):
    """The same through `python dpm_at.py` / `python cm_at.py` themselves (the __main__ wrapper)."""
    for script, argv in (("dpm_at.py", ["--lr", "-1"]), ("cm_at.py", ["--teacher", "none.pt", "--ema-decay", "2"])):
        r = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv, "--out", str(tmp_path / "r")],
                           capture_output=True, text=True, timeout=300)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), r.stderr
        assert "must be" in lines[0] and "Traceback" not in r.stderr and not (tmp_path / "r").exists()


def edited(run, tmp_path, name: str, **changes) -> str:
    """A copy of the run's checkpoint with some entries replaced (None deletes one)."""
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    for key, value in changes.items():
        ckpt.pop(key) if value is None else ckpt.__setitem__(key, value)
    torch.save(ckpt, tmp_path / name)
    return str(tmp_path / name)


def mlp_checkpoint(run, tmp_path) -> str:
    """A 2-D point model's checkpoint (the MLP of --dataset ring), made from the run's by swapping the network."""
    net_config = unet.preset_config("mlp2d", in_channels=2)
    state = unet.build_from_config(net_config).state_dict()
    args = dict(torch.load(run / "ckpt.pt", weights_only=True)["args"], preset="mlp2d", dataset="ring")
    return edited(run, tmp_path, "mlp.pt", net=net_config, model=state, ema=state, args=args)


@pytest.mark.parametrize("case,expect", [
    ("no_model", "lacks model"), ("other_preset", "do not fit its network config"),
    ("mlp_for_images", "holds a 2-D point MLP"), ("cm_as_teacher", "is not a dpm_at.py checkpoint"),
    ("code_pickle", "could run code"), ("other_T", "--diffusion-steps 500 contradicts"),
    ("no_opt_resume", "lacks the optimizer"), ("robustness_missing", "does not exist")])
def test_mismatched_checkpoints(run, tmp_path, capsys, case, expect):
    """A checkpoint that does not fit the command is refused before anything is built or written, and stays as it
    was: missing weights, another preset's weights, a 2-D MLP for images, a CM as teacher, a file with code, another
    T, a weights-only file given to --resume, and robustness.py with a missing file."""
    out = str(tmp_path / "r")
    small = unet.preset_config("small")
    if case == "no_model":
        rc = dpm_at.cli(["--resume", edited(run, tmp_path, "a.pt", model=None), "--out", out])
    elif case == "other_preset":
        rc = dpm_at.cli(["--init-from", edited(run, tmp_path, "a.pt", net=small), *QUICK, "--out", out])
    elif case == "mlp_for_images":
        rc = dpm_at.cli(["--init-from", mlp_checkpoint(run, tmp_path), *QUICK, "--out", out])
    elif case == "cm_as_teacher":
        rc = cm_at.cli(["--teacher", edited(run, tmp_path, "a.pt", kind="cm"), "--tiny", "--out", out])
    elif case == "code_pickle":
        with open(tmp_path / "a.pt", "wb") as f:
            pickle.dump({"model": np.ones(2)}, f, protocol=2)  # unpickling would call numpy: weights_only refuses it
        rc = dpm_at.cli(["--resume", str(tmp_path / "a.pt"), "--out", out])
    elif case == "other_T":
        rc = dpm_at.cli(["--resume", str(run / "ckpt.pt"), "--diffusion-steps", "500", "--out", out])
    elif case == "no_opt_resume":
        rc = dpm_at.cli(["--resume", edited(run, tmp_path, "a.pt", opt=None), "--out", out])
    else:
        rc = robustness.cli(["--std", str(tmp_path / "missing.pt"), "--at", str(run / "ckpt.pt"), "--out", out])
    before = snapshot(tmp_path)
    assert_refused(rc, capsys, expect)
    assert snapshot(tmp_path) == before and not os.path.exists(out)


def test_disk_full_checkpoint_and_grid(run, tmp_path, monkeypatch, capsys):
    """A checkpoint or grid write that fails (OSError: disk full) removes its temp file and ends in one line saying the
    earlier files are intact; they are byte-identical. A killed run's temp files are cleaned up at the next start."""
    out = tmp_path / "run"
    shutil.copytree(run, out)
    (out / "ckpt.pt.tmp12345").write_bytes(b"partial")  # left by a killed run of an older version
    before = snapshot(out)

    def full(obj, f, *a, **k):
        with open(f, "wb") as partial:
            partial.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    def unchanged(now: dict) -> bool:  # the checkpoint and grids as they were; metrics.jsonl only grew
        kept = [k for k in before if k.endswith((".pt", ".png"))]
        return all(now[k] == before[k] for k in kept) and now["metrics.jsonl"].startswith(before["metrics.jsonl"])

    monkeypatch.setattr(torch, "save", full)
    rc = dpm_at.cli(["--resume", str(out / "ckpt.pt"), "--steps", "2", "--out", str(out)])
    assert "the previous" in assert_refused(rc, capsys, "No space left on device")
    after = snapshot(out)
    assert unchanged(after) and not [k for k in after if ".tmp" in k]
    monkeypatch.undo()

    def no_space(self, f, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", no_space)
    rc = dpm_at.cli(["--resume", str(out / "ckpt.pt"), "--steps", "3", "--out", str(out)])
    assert "grid_0000003.png" in assert_refused(rc, capsys, "earlier grids and checkpoint are intact")
    again = snapshot(out)
    assert unchanged(again) and not [k for k in again if ".tmp" in k or "0000003" in k]


def test_cm_checkpoint_write_failure_keeps_the_old_one(tmp_path, monkeypatch):
    """cm_at.save_checkpoint: a failed torch.save leaves the previous file and no temp file."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"previous")

    def full(obj, f):
        with open(f, "wb") as partial:
            partial.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(cm_at.UserError, match="previous .* is intact"):
        cm_at.save_checkpoint(str(path), {})
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_planted_cifar_pickle_runs_no_code(tmp_path, capsys):
    """A data_batch_1 whose unpickling would create a file is refused in one line, and the file is not created: the
    CIFAR-10 reader admits only numpy's array globals."""
    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return builtins.open, (str(marker), "w")

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": Payload()}, protocol=4))
    before = snapshot(tmp_path)
    rc = dpm_at.cli(["--dataset", "cifar10", "--tiny", "--data-dir", str(tmp_path / "data"), "--device", "cpu",
                     "--out", str(tmp_path / "r")])
    assert_refused(rc, capsys, "open, which no CIFAR-10 batch holds")
    assert not marker.exists() and snapshot(tmp_path) == before


def test_resume_without_flags_continues_the_run(tmp_path, capsys):
    """--resume alone continues with the first run's settings (not the defaults), a changed flag gets a one-line
    note, and args_history.jsonl keeps one record per start."""
    out = tmp_path / "r"
    first = [*QUICK, "--steps", "1", "--lr", "5e-4", "--ema-decay", "0.5", "--adv-steps", "2", "--out", str(out)]
    assert dpm_at.cli(first) == 0
    settings = json.loads((out / "args.json").read_text())
    capsys.readouterr()
    assert dpm_at.cli(["--resume", str(out / "ckpt.pt")]) == 0
    assert "note:" not in capsys.readouterr().out
    resumed = json.loads((out / "args.json").read_text())
    ignore = ("resume", "explicit", "out")
    assert {k: v for k, v in resumed.items() if k not in ignore} == \
        {k: v for k, v in settings.items() if k not in ignore}
    assert resumed["lr"] == 5e-4 and resumed["ema_decay"] == 0.5 and resumed["num_shapes"] == 16
    assert dpm_at.cli(["--resume", str(out / "ckpt.pt"), "--steps", "2"]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "--steps 2 (was 1)" in notes[0]
    history = [json.loads(line) for line in (out / "args_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [0, 1, 1] and history[2]["argv"][-2:] == ["--steps", "2"]
    assert torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def test_failed_metrics_append_cuts_back(tmp_path, monkeypatch):
    """A metrics.jsonl append that fails half-way (disk full) cuts the file back to its earlier lines and stops in
    one line that says so."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    real_open = open

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:5])
            self.f.flush()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(dpm_at, "open", lambda *a, **k: HalfWriter(real_open(*a, **k)), raising=False)
    log = dpm_at.Logger.__new__(dpm_at.Logger)
    log.args = type("Args", (), {"out": str(tmp_path)})()
    with pytest.raises(dpm_at.UserError, match="its earlier lines .* are intact"):
        log.append(str(path), '{"step": 2}')
    assert path.read_text() == '{"step": 1}\n'
