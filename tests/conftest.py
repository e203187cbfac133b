"""Test environment: no network, no GPU, no display."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A default synthetic twin dataset, generated once per test session."""
    from dcal_lib.synthetic import make_demo_data

    out = tmp_path_factory.mktemp("demo")
    make_demo_data(out)
    return out
