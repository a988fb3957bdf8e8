"""Several processes under torchrun (gloo on CPU), the nanoGPT way: dpm_at.py and cm_at.py train on
DistributedDataParallel with one local batch per process, only rank 0 writes files, a 2-process checkpoint resumes
in one process, and a batch size the processes do not divide is a clean error on every rank."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "shapes", "--tiny", "--num-shapes", "16", "--batch-size", "4", "--num-grid", "1",
        "--log-every", "1", "--save-every", "1", "--grid-every", "1"]


def launch(script, *argv, nproc=2, timeout=300):
    """python SCRIPT ARGV in one process (nproc=1) or under torchrun with nproc gloo processes."""
    if nproc == 1:
        cmd = [sys.executable, script, *argv]
    else:
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={port}", script, *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_two_processes_rank0_writes_and_one_process_resumes(tmp_path):
    """torchrun dpm_at.py: one metrics record per log step and one set of grids (rank 0 alone writes), finite
    losses, the plain (unwrapped) weights in the checkpoint, and the 2-process checkpoint resumes in one process."""
    two = tmp_path / "two"
    common = [*TINY, "--grid-steps", "1", "--t-sampler", "loss-second-moment"]
    r = launch("dpm_at.py", *common, "--steps", "2", "--out", str(two), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done:") == 1 and "2 process(es)" in r.stdout
    assert sorted(p.name for p in two.iterdir()) == ["args.json", "args_history.jsonl", "ckpt.pt", "grid_0000001.png",
                                                     "grid_0000002.png", "metrics.jsonl"]
    assert [rec["step"] for rec in records(two)] == [1, 2]
    assert all(math.isfinite(rec["loss"]) and rec["delta_norm"] > 0 for rec in records(two))
    ckpt = torch.load(two / "ckpt.pt", weights_only=True)
    assert all(not k.startswith("module.") for k in ckpt["model"])
    r = launch("dpm_at.py", *common, "--steps", "3", "--resume", str(two / "ckpt.pt"), nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(two / "ckpt.pt", weights_only=True)["step"] == 3
    assert [rec["step"] for rec in records(two)] == [1, 2, 3]


def test_cli_cm_two_processes(tmp_path):
    """torchrun cm_at.py: two processes train CD + AT with finite losses and write the files one process writes."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_cm_at import perturbed_unet, teacher_ckpt, tiny_net
    config = tiny_net(image_size=8)
    torch.save(teacher_ckpt(perturbed_unet(config), config), tmp_path / "teacher.pt")
    common = [*TINY, "--teacher", str(tmp_path / "teacher.pt"), "--steps", "2"]
    r = launch("cm_at.py", *common, "--out", str(tmp_path / "two"), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch("cm_at.py", *common, "--out", str(tmp_path / "one"), nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [rec["step"] for rec in records(tmp_path / "two")] == [1, 2]
    assert all(math.isfinite(rec["loss"]) for rec in records(tmp_path / "two"))
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


def test_batch_not_divisible_is_refused_before_any_collective(tmp_path, monkeypatch):
    """A global batch that the processes do not divide: every rank raises the one-line error before it joins the
    process group (so none waits for the others) and before anything is written. Run in-process as rank 1 of 2."""
    import dpm_at
    import torch.distributed as dist

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(dpm_at.UserError, match="--batch-size 3 is the global batch: it must divide by 2"):
        dpm_at.main(dpm_at.parse_args([*TINY, "--batch-size", "3", "--out", str(tmp_path / "r"), "--device", "cpu"]))
    assert not dist.is_initialized() and not (tmp_path / "r").exists()
