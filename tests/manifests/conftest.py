"""Fixtures of the manifest tests: the CRD, the samples and the rendered deploy/ base."""

from __future__ import annotations

import pytest

from .support import CRD_FILE, DEPLOY, SAMPLES, Doc, kubectl_kustomize, load_docs


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slow: builds the wheel into a fresh venv (needs PyPI); deselect with -m 'not slow'",
    )


@pytest.fixture(scope="session")
def rendered() -> list[Doc]:
    """`kubectl kustomize deploy/`, rendered once."""
    return kubectl_kustomize(DEPLOY)


@pytest.fixture(scope="session")
def crd() -> Doc:
    (doc,) = load_docs(CRD_FILE)
    return doc


@pytest.fixture(scope="session")
def samples() -> dict[str, Doc]:
    """Each sample BlockPull, by file name."""
    found = {}
    for path in sorted(SAMPLES.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            (doc,) = load_docs(path)
            found[path.name] = doc
    return found
