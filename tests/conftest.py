"""Test-wide settings: one CPU thread, in this process and in the subprocesses the CLI tests start.

On a 2-core machine that is busy with anything else, two OpenMP threads were 3-10x slower per op than one in our
measurements (a descheduled thread stalls every barrier), so the suite pins one thread for a predictable run time.
"""
import os

import torch

os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
