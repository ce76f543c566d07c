"""Project-wide pytest set-up: the QEMU and libvirt labs' fixtures and the `--cluster` option."""

import pytest

pytest_plugins = ["qemulab.pytest_plugin", "virtlab.pytest_plugin"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cluster",
        action="store_true",
        default=False,
        help="run the operator tests (tests/operator) against the cluster in $KUBECONFIG instead of "
        "the in-process API stand-in; the CRD must be installed and QEMU must run on this machine",
    )
