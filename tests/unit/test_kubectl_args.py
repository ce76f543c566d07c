"""The plugin's command line and kubeconfig rules (files on disk, no server)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from blockpull.kubectl.args import duration, parse
from blockpull.kubectl.config import PluginError, resolve
from blockpull.kubectl.main import generated_prefix


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("2.5", 2.5), ("0", 0.0), ("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0), ("500ms", 0.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-1", "5x", "1h 30m", "nan", "inf", "30s5"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration(text)


def test_kubectl_flags_go_before_or_after_the_subcommand() -> None:
    args = parse(["-n", "vms", "wait", "a", "b", "--timeout", "1m", "--context", "c"])
    assert (args.namespace, args.context, args.names, args.timeout) == ("vms", "c", ["a", "b"], 60.0)
    args = parse(["watch", "-A", "-l", "app=web", "-o", "json"])
    assert (args.all_namespaces, args.selector, args.output) == (True, "app=web", "json")
    # kubectl's spellings: -n=NS, -ojson, --namespace=NS
    args = parse(["watch", "-n=vms", "-ojson", "-l=a=b"])
    assert (args.namespace, args.output, args.selector) == ("vms", "json", "a=b")
    assert parse(["--namespace=vms", "wait", "x"]).namespace == "vms"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["wait", "a", "-A"], "-A/--all-namespaces is for watch only"),
        (["watch", "a", "-A"], "cannot be named across all namespaces"),
        (["create", "vm", "vda", "--node", "n", "--timeout", "1m"], "--timeout needs --wait"),
        (["create", "vm", "vda", "--node", "n", "--bandwidth", "-1"], "bandwidth"),
        (["abort", "a", "--timeout", "0"], "must be more than 0"),
        (["wait"], "required: NAME"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_are_plugin_errors(argv: list[str], message: str) -> None:
    with pytest.raises(PluginError) as caught:
        parse(argv)
    assert caught.value.exit_status == 2
    assert message in caught.value.message


@pytest.mark.parametrize(
    ("vm", "disk", "prefix"),
    [
        ("web-1", "root", "web-1-root-"),
        ("web-1", "/var/lib/vms/web-1/Root_Disk.qcow2", "web-1-root-disk-"),
        ("web-1", "libvirt-1-format", "web-1-libvirt-1-format-"),
        ("a" * 63, "b" * 63, "a" * 52 + "-"),
    ],
)
def test_generated_names_are_dns_labels(vm: str, disk: str, prefix: str) -> None:
    assert generated_prefix(vm, disk) == prefix


def kubeconfig(path: Path, *, current: str = "one", namespace: str | None = "vms") -> Path:
    context: dict[str, str] = {"cluster": "c", "user": "u"}
    if namespace:
        context["namespace"] = namespace
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [
                    {"name": "one", "context": context},
                    {"name": "two", "context": {"cluster": "c", "user": "u"}},
                ],
                "current-context": current,
            }
        )
    )
    return path


def test_kubeconfig_precedence_and_the_contexts_namespace(tmp_path: Path) -> None:
    a = kubeconfig(tmp_path / "a")
    home = tmp_path / "home"
    (home / ".kube").mkdir(parents=True)
    kubeconfig(home / ".kube" / "config", current="two")
    env = {"HOME": str(home)}
    assert (
        resolve(kubeconfig=None, context=None, namespace=None, request_timeout=1, environ=env).namespace
        == "default"
    )
    target = resolve(
        kubeconfig=None,
        context=None,
        namespace=None,
        request_timeout=1,
        environ={**env, "KUBECONFIG": f"/nope:{a}"},
    )
    assert (target.config_files, target.namespace) == (str(a), "vms")
    target = resolve(kubeconfig=str(a), context="two", namespace=None, request_timeout=1, environ=env)
    assert target.namespace == "default"  # context two names no namespace
    assert (
        resolve(kubeconfig=str(a), context=None, namespace="x", request_timeout=1, environ=env).namespace
        == "x"
    )


def test_kubeconfig_errors(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    with pytest.raises(PluginError, match="no kubeconfig"):
        resolve(kubeconfig=None, context=None, namespace=None, request_timeout=1, environ=env)
    with pytest.raises(PluginError, match="no such file"):
        resolve(kubeconfig=str(tmp_path / "x"), context=None, namespace=None, request_timeout=1, environ=env)
    a = kubeconfig(tmp_path / "a")
    with pytest.raises(PluginError, match='context "three" does not exist'):
        resolve(kubeconfig=str(a), context="three", namespace=None, request_timeout=1, environ=env)
