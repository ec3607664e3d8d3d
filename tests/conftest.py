"""The suite evaluates thousands of tiny float64 convolutions: one thread each, no OpenMP waits on a busy machine."""

import torch

torch.set_num_threads(1)
