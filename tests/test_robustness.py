"""Checks of experiments/robustness.py's perturbations (docs/method.md §6): the budget in EDM space, and PGD beating a
random direction."""
import math
import os
import sys
from types import SimpleNamespace

import pytest
import torch

import attacks

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import robustness  # noqa: E402


def linear_denoiser(x_e, sigma):
    """D(x) = A x with one stiff direction: a PGD attack should find it, a random direction mostly misses it."""
    scale = torch.ones(x_e[0].numel())
    scale[0] = 10.0
    return (x_e.flatten(1) * scale).view_as(x_e)


def test_attack_radius_is_the_vp_budget_mapped_to_edm_space():
    """||delta|| = gamma sqrt(d) sqrt(1 + sigma^2) for both kinds (docs/method.md §3.3, §6); PGD's change of D beats
    random."""
    x_e = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    cfg = SimpleNamespace(pgd_steps=5)
    radius = 0.1 * math.sqrt(48) * (1 + sigma**2).sqrt()
    changes = {}
    for kind in ("random", "pgd"):
        delta = robustness.attack(linear_denoiser, x_e, sigma, 0.1, kind, cfg, torch.Generator().manual_seed(1))
        assert attacks.per_sample_norm(delta).flatten().tolist() == pytest.approx(radius.tolist(), rel=1e-5)
        changes[kind] = (linear_denoiser(x_e + delta, sigma) - linear_denoiser(x_e, sigma)).flatten(1).norm(dim=1)
    # the best direction is the stiff coordinate: change 10 r; PGD gets close, a random direction does not
    assert (changes["pgd"] > 0.95 * 10 * radius).all() and (changes["pgd"] > 2 * changes["random"]).all()


def test_perturbed_denoiser_changes_the_output_within_budget():
    """The sampler's wrapped denoiser differs from the clean one by at most ||A|| r (here 10 r) per sample."""
    x_e = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    sigma = torch.full((3,), 2.0, dtype=torch.float64)
    cfg = SimpleNamespace(pgd_steps=3)
    D = robustness.perturbed(linear_denoiser, 0.05, "pgd", cfg, torch.Generator().manual_seed(3))
    change = (D(x_e, sigma) - linear_denoiser(x_e, sigma)).flatten(1).norm(dim=1)
    radius = 0.05 * math.sqrt(32) * math.sqrt(5)
    assert (change > 0).all() and (change <= 10 * radius * (1 + 1e-5)).all()
