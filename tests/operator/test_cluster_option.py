"""`pytest --cluster` runs the operator tests unchanged against the cluster in $KUBECONFIG.

There is no real cluster here, so the option's own path is proven against the API stand-in
run as a separate server process, reached only through a kubeconfig, exactly as a real
cluster would be (CRD installed beforehand, no request recording).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from harness import CRD, REPO


def test_operator_tests_run_against_a_cluster_named_by_kubeconfig(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if request.config.getoption("--cluster"):
        pytest.skip("already running against a cluster")
    kubeconfig = tmp_path / "kubeconfig"
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "testapiserver",
            "--port",
            "0",
            "--kubeconfig",
            str(kubeconfig),
            "--crd",
            str(CRD),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().startswith("http://127.0.0.1:")
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        selected = [
            "tests/operator/test_lifecycle.py::test_full_pull_completes_with_every_status_field",
            "tests/operator/test_two_agents.py",
            "tests/operator/test_rbac.py::test_the_agents_cluster_role_covers_exactly_its_requests",
        ]
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "--cluster", "-q", "-p", "no:cacheprovider", "-rs", *selected],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        summary = result.stdout.strip().splitlines()[-1]
        assert result.returncode == 0, result.stdout[-5000:]
        assert "2 passed, 1 skipped" in summary, result.stdout[-3000:]
        assert "a real cluster enforces RBAC itself" in result.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(10)
