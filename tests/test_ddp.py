"""Several processes under torchrun (gloo on CPU): dpm_at.py and cm_at.py on DistributedDataParallel match a
one-process run over the same global batch, only rank 0 writes files, a 2-process checkpoint resumes in one
process, and a batch size the processes do not divide is a clean error on every rank."""
import json
import os
import socket
import subprocess
import sys
import textwrap

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


# The training loop of dpm_at.main reduced to what we compare: run as `python` it is one process, under torchrun
# each rank keeps its rows of the global batch. It dumps the weights after every step, per rank.
WORKER = textwrap.dedent("""
    import sys
    import torch
    import data, dpm_at, sampler, unet

    out = sys.argv[1]
    args = dpm_at.resolve_args(dpm_at.parse_args(
        ["--tiny", "--batch-size", "4", "--num-shapes", "16", "--t-sampler", "loss-second-moment", "--device", "cpu"]))
    rank, world = dpm_at.setup_distributed(args)
    torch.manual_seed(0)
    net = unet.UNet(**unet.PRESETS["tiny"], in_channels=3, image_size=32, out_channels=3)
    for p in net.parameters():  # randomise the zero-initialised layers too, so every weight gets a gradient
        torch.nn.init.normal_(p, std=0.05 if p.dim() > 1 else 0.01)
    ema = unet.UNet(**unet.PRESETS["tiny"], in_channels=3, image_size=32, out_channels=3).requires_grad_(False)
    ema.load_state_dict(net.state_dict())
    train_net, _, _ = dpm_at.fast_path(net, args)
    # SGD rather than AdamW: AdamW divides by sqrt(v), which turns float noise in near-zero gradients into
    # lr-sized steps and would hide the comparison; the update rule itself is the same code in both runs.
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    images = data.load_dataset("shapes", "./data", seed=0, num_shapes=16)
    alpha_bar = sampler.alpha_bar_from_beta(sampler.make_beta("cosine"))
    t_state = dict(history=torch.zeros(1000, 10), count=torch.zeros(1000, dtype=torch.long))
    generator = torch.Generator().manual_seed(0)
    rows = dpm_at.global_rows(args.batch_size // world)[1]
    weights, losses = [], []
    for step in range(3):
        x0 = data.random_batch(images, args.batch_size, generator)[rows]
        clean, last, _ = dpm_at.train_step(train_net, ema, opt, x0, alpha_bar, args, generator, t_state)
        weights.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
        losses.append(torch.stack([clean, last]))
    torch.save(dict(weights=weights, losses=losses, t_state=t_state, world=world), f"{out}/rank{rank}_of{world}.pt")
""")


def test_two_ranks_identical_and_equal_to_one_process(tmp_path):
    """After every AT step (K = 3 synchronised optimizer steps) both ranks hold identical weights and t-sampler
    history, equal to one process over the same global batch (SPEC §3.4 loop; IDDPM loss-second-moment history)."""
    (tmp_path / "worker.py").write_text(WORKER)
    r = launch(str(tmp_path / "worker.py"), str(tmp_path), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch(str(tmp_path / "worker.py"), str(tmp_path), nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1, single = (torch.load(tmp_path / f, weights_only=True)
                            for f in ("rank0_of2.pt", "rank1_of2.pt", "rank0_of1.pt"))
    assert rank0["world"] == 2 and single["world"] == 1
    for step in range(3):
        assert torch.equal(rank0["weights"][step], rank1["weights"][step]), step
        assert torch.allclose(rank0["weights"][step], single["weights"][step], atol=1e-6, rtol=0), step
        # each rank's losses are over its own rows: their mean is the global batch's
        mean = (rank0["losses"][step] + rank1["losses"][step]) / 2
        assert torch.allclose(mean, single["losses"][step], rtol=1e-5), step
        assert not torch.allclose(rank0["losses"][step], rank1["losses"][step])  # different rows, not a copy
    for key in ("history", "count"):
        assert torch.equal(rank0["t_state"][key], rank1["t_state"][key])
        assert torch.allclose(rank0["t_state"][key].double(), single["t_state"][key].double(), atol=1e-6)
    assert int(rank0["t_state"]["count"].sum()) == 3 * 4  # every sample of the global batch, once


def test_cli_two_processes_rank0_writes_and_one_process_resumes(tmp_path):
    """torchrun dpm_at.py: one metrics record per log step and one set of grids (rank 0 alone writes), the same
    losses as one process over the same global batch, and the 2-process checkpoint resumes in one process."""
    two, one = tmp_path / "two", tmp_path / "one"
    common = [*TINY, "--grid-steps", "1", "--t-sampler", "loss-second-moment"]
    r = launch("dpm_at.py", *common, "--steps", "2", "--out", str(two), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done:") == 1 and "2 processes x 2 images" in r.stdout
    assert sorted(p.name for p in two.iterdir()) == ["args.json", "ckpt.pt", "grid_0000001.png", "grid_0000002.png",
                                                     "metrics.jsonl"]
    assert [rec["step"] for rec in records(two)] == [1, 2]
    r = launch("dpm_at.py", *common, "--steps", "2", "--out", str(one), nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    for a, b in zip(records(two), records(one)):
        for key in ("loss", "adv_loss", "delta_norm"):
            assert abs(a[key] - b[key]) <= 1e-4 * abs(b[key]), (key, a, b)
    ckpt2, ckpt1 = (torch.load(d / "ckpt.pt", weights_only=True) for d in (two, one))
    assert torch.equal(ckpt2["rng_gen"], ckpt1["rng_gen"])  # the same stream: resume with any number of processes
    assert all(not k.startswith("module.") for k in ckpt2["model"])  # the unwrapped network
    assert torch.allclose(ckpt2["t_state"]["history"], ckpt1["t_state"]["history"], atol=1e-5)

    r = launch("dpm_at.py", *common, "--steps", "3", "--resume", str(two / "ckpt.pt"), nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(two / "ckpt.pt", weights_only=True)["step"] == 3
    assert [rec["step"] for rec in records(two)] == [1, 2, 3]


def test_cli_cm_two_processes_match_one(tmp_path):
    """torchrun cm_at.py: the 2-process CD-AT losses equal the 1-process ones over the same global batch, and only
    rank 0 writes (SPEC §4.4 loop)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_cm_at import perturbed_unet, teacher_ckpt, tiny_net
    config = tiny_net(image_size=8)
    torch.save(teacher_ckpt(perturbed_unet(config), config), tmp_path / "teacher.pt")
    common = [*TINY, "--teacher", str(tmp_path / "teacher.pt"), "--steps", "2"]
    r = launch("cm_at.py", *common, "--out", str(tmp_path / "two"), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    r = launch("cm_at.py", *common, "--out", str(tmp_path / "one"), nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    two, one = records(tmp_path / "two"), records(tmp_path / "one")
    assert [rec["step"] for rec in two] == [1, 2]
    for a, b in zip(two, one):
        for key in ("loss", "adv_loss", "delta_norm"):
            assert abs(a[key] - b[key]) <= 1e-4 * abs(b[key]), (key, a, b)
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))


def test_cli_batch_not_divisible_errors_on_every_rank(tmp_path):
    """A global batch that the processes do not divide: one `error:` line from every rank, exit != 0, no hang."""
    r = launch("dpm_at.py", *TINY, "--batch-size", "3", "--out", str(tmp_path / "r"), nproc=2, timeout=120)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("--batch-size 3" in e and "divisible" in e for e in errors), r.stderr[-2000:]
    # torchrun itself reports the failed children with a traceback of its own; the ranks print none
    assert 'dpm_at.py", line' not in r.stderr and not (tmp_path / "r").exists()
