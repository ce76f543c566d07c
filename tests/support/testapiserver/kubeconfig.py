"""Kubeconfig files pointing clients (kubectl, kopf, the official client) at the stand-in.

Owns the file's shape: one cluster, one user whose bearer token (and impersonated name) *is* the
user name the server records, one context with a default namespace.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def kubeconfig(url: str, user: str = "admin", namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "testapiserver", "cluster": {"server": url}}],
        # The token identifies kopf and the official client; client-go (kubectl) does not send
        # tokens over plain http, so the user is also impersonated (``as:``) for it.
        "users": [{"name": user, "user": {"token": user, "as": user}}],
        "contexts": [
            {
                "name": "testapiserver",
                "context": {"cluster": "testapiserver", "user": user, "namespace": namespace},
            }
        ],
        "current-context": "testapiserver",
        "preferences": {},
    }


def write_kubeconfig(path: Path, url: str, user: str = "admin", namespace: str = "default") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(kubeconfig(url, user, namespace), sort_keys=False))
    return path
