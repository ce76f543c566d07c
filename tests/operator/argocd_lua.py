"""Argo CD's health-check runtime, rebuilt on Lua 5.1 (PyPI `lupa`, `lupa.lua51`).

Argo CD (util/lua/lua.go) runs a health check in gopher-lua, a Lua 5.1, with
`SkipOpenLibs` and then only the package, base and table libraries and a "safe" `os` holding
`time` and `date`; the object is the global `obj`; the script's return value is the health.
There is no `string` library (so no `string.format` and, without its metatable, no
`s:lower()`), no `math`, `io`, `debug` or `coroutine`. Argo CD's own test harness opens all
libraries, so a script using `string` passes there and fails in production: here it fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lupa import lua51

REPO = Path(__file__).resolve().parents[2]
HEALTH_LUA = REPO / "deploy" / "argocd" / "health.lua"
#: Argo CD's health statuses; anything else a script returns becomes Unknown.
STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}

_STRIP = """
local time, date = os.time, os.date
debug.setmetatable("", nil)  -- no string methods: s:lower() must fail as it does in Argo CD
string, io, debug, coroutine, math, python = nil, nil, nil, nil, nil, nil
os = {time = time, date = date}
for _, name in ipairs({"string", "io", "debug", "coroutine", "math", "python"}) do
  package.loaded[name] = nil
end
package.loaded.os = os
"""


class ArgoLua:
    """One stripped Lua 5.1 state per check, as Argo CD makes one per call."""

    def __init__(self) -> None:
        self.lua = lua51.LuaRuntime(register_eval=False, register_builtins=False, unpack_returned_tuples=True)
        self.lua.execute(_STRIP)

    def run(self, script: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        self.lua.globals().obj = self._table(obj)
        result = self.lua.execute(script)
        return {str(k): v for k, v in result.items()} if result is not None else {}

    def _table(self, value: Any) -> Any:
        if isinstance(value, Mapping):
            return self.lua.table_from({k: self._table(v) for k, v in value.items()})
        if isinstance(value, list):
            return self.lua.table_from([self._table(v) for v in value])
        return value


def health(obj: Mapping[str, Any], script: str | None = None) -> dict[str, Any]:
    """deploy/argocd/health.lua (or `script`) on `obj` in a fresh Argo-CD-like runtime."""
    result = ArgoLua().run(script if script is not None else HEALTH_LUA.read_text(), obj)
    assert result.get("status") in STATUSES, result
    return result
