"""Shared test set-up: the `cuda` marker skips without a GPU; fresh random inputs every run."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA GPU')
    for item in items:
        if 'cuda' in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A generator seeded from the OS: every run draws new inputs."""
    gen = torch.Generator()
    gen.seed()
    return gen
