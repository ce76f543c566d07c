"""Where a BlockPull's VM is for libvirt: the connection URI and the domain name (pure).

Owns: `BLOCKPULL_LIBVIRT_URI` and `BLOCKPULL_DOMAIN_TEMPLATE`, checked once at start. Both
substitute only `{namespace}` and `{vm}`, each a DNS-1123 label (so a name can never carry a
`/`, `..`, `&` or `?`). In a URI, placeholders may appear only in the `socket=` path (a per-VM
daemon's socket); that path is checked like the QMP socket template: absolute, no `..`, and
every substitution stays inside its fixed directory. A domain template must name the VM; one
without `{namespace}` lets every namespace reach every domain, so it needs a single watched
namespace (checked by the agent's settings).
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from blockpull.errors import InvalidSpec

DEFAULT_DOMAIN_TEMPLATE = "{namespace}_{vm}"
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _check_labels(namespace: str, vm: str) -> None:
    for what, value in (("namespace", namespace), ("vm", vm)):
        if not _DNS1123_LABEL.match(value):
            raise InvalidSpec(f"{what} {value!r} is not a DNS-1123 label")


def _placeholders(text: str, what: str) -> list[str]:
    names = _PLACEHOLDER.findall(text)
    if text.count("{") != len(names) or text.count("}") != len(names):
        raise InvalidSpec(f"{what} {text!r} has an unbalanced brace")
    unknown = sorted(set(names) - {"namespace", "vm"})
    if unknown:
        raise InvalidSpec(f"{what} {text!r} may use only {{namespace}} and {{vm}}, not {unknown}")
    return names


@dataclass(frozen=True)
class DomainTemplate:
    """The libvirt domain name of (namespace, vm)."""

    template: str = DEFAULT_DOMAIN_TEMPLATE

    def __post_init__(self) -> None:
        names = _placeholders(self.template, "domain template")
        if "vm" not in names:
            raise InvalidSpec(f"domain template {self.template!r} must contain {{vm}}")
        if "/" in self.template or any(c.isspace() for c in self.template):
            raise InvalidSpec(f"domain template {self.template!r} must not contain '/' or spaces")

    @property
    def has_namespace(self) -> bool:
        return "{namespace}" in self.template

    def domain_for(self, namespace: str, vm: str) -> str:
        _check_labels(namespace, vm)
        return self.template.format(namespace=namespace, vm=vm)


@dataclass(frozen=True)
class URITemplate:
    """The libvirt URI of (namespace, vm): one URI for all, or one per VM through `socket=`."""

    template: str

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.template)
        if not parts.scheme:
            raise InvalidSpec(f"libvirt URI {self.template!r} has no scheme (e.g. qemu:///system)")
        names = _placeholders(self.template, "libvirt URI")
        if not names:
            return
        socket = self._socket_template()
        if socket is None or len(_PLACEHOLDER.findall(socket)) != len(names):
            raise InvalidSpec(
                f"libvirt URI {self.template!r}: {{namespace}} and {{vm}} may appear only in its socket= path"
            )
        if not socket.startswith("/"):
            raise InvalidSpec(f"libvirt URI {self.template!r}: the socket path must be absolute")
        if ".." in socket.split("/"):
            raise InvalidSpec(f"libvirt URI {self.template!r}: the socket path must not contain '..'")
        if sorted(set(names)) != ["namespace", "vm"]:
            raise InvalidSpec(
                f"libvirt URI {self.template!r}: a per-VM socket path needs both {{namespace}} and {{vm}}"
            )
        if self.fixed_directory in ("", "/"):
            raise InvalidSpec(
                f"libvirt URI {self.template!r}: the socket path must start with a fixed directory"
            )

    def _socket_template(self) -> str | None:
        query = urllib.parse.urlsplit(self.template).query
        values = urllib.parse.parse_qs(query, keep_blank_values=True).get("socket")
        return values[0] if values else None

    @property
    def per_vm(self) -> bool:
        return "{" in self.template

    @property
    def fixed_directory(self) -> str:
        socket = self._socket_template() or ""
        prefix = socket.split("{", 1)[0]
        return prefix if prefix.endswith("/") else prefix.rsplit("/", 1)[0] + "/"

    def uri_for(self, namespace: str, vm: str) -> str:
        if not self.per_vm:
            return self.template
        _check_labels(namespace, vm)
        uri = self.template.format(namespace=namespace, vm=vm)
        socket = urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query).get("socket", [""])[0]
        if not socket.startswith(self.fixed_directory) or "/../" in f"{socket}/":
            raise InvalidSpec(f"libvirt socket {socket!r} leaves {self.fixed_directory}")
        return uri
