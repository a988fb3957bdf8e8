"""Test-wide settings: CPU only, and denormals flushed as the entry scripts do (see dpm_at.main)."""
import torch

torch.set_flush_denormal(True)
