import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_inherited_columns(monkeypatch):
    """pytest-xdist's workers export COLUMNS=80 and a plain run does not: the CLI honours COLUMNS
    for piped output, so every test starts without it and a test that wants a width sets it."""
    monkeypatch.delenv("COLUMNS", raising=False)
