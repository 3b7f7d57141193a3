"""Fixtures shared by the training-related tests."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    # one torch thread: on a small shared CPU, two OpenMP threads per process oversubscribe the
    # cores and run many times slower (benchmarks/RESULTS.md, section 2.2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate_state(one_torch_thread):
    """One torch thread, and accelerate's process-wide singletons reset after the test."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


# The trainer's settings before the recommended start became the default (issue 12/14): tiny networks
# trained from scratch in a few steps, which the training tests were designed around. Imported by the
# test modules (pytest puts this folder on sys.path).
SCRATCH = [
    "model.pretrained=null", "method.strong_warmup=0", "method.lambda_warmup=0", "method.dcr_supervision=split",
    "optim.name=sgd", "optim.lr=0.05", "optim.head_lr_mult=1", "dii.init=0.5", "dii.score=paper", "dii.tau=20",
    "train.cpu_threads=1",
]


def train_isolated(cfg):
    """Run the trainer in this process for a module-scoped fixture: one torch thread during the run,
    then the thread count and accelerate's process-wide singletons restored (the function-scoped
    ``fresh_accelerate_state`` fixture cannot serve a module-scoped one)."""
    from accelerate.state import AcceleratorState, GradientState

    from hybrid_accel import train as trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return trainer.train(cfg)
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
