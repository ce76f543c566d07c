"""deploy/argocd/health.lua on real objects, in a Lua 5.1 stripped the way Argo CD strips it.

The inputs (deploy/argocd/testdata) are objects recorded from real agent runs by
test_gitops_status.py (`BLOCKPULL_RECORD_OBJECTS=DIR`), laid out like Argo CD's own
`resource_customizations/<group>/<Kind>/` tests; test_gitops_status.py also runs the check on
live objects. No QEMU is needed here.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from argocd_lua import HEALTH_LUA, ArgoLua, health
from lupa import lua51

ARGOCD = HEALTH_LUA.parent
CASES: list[dict[str, Any]] = yaml.safe_load((ARGOCD / "health_test.yaml").read_text())["tests"]


@pytest.mark.parametrize("case", CASES, ids=[c["inputPath"].split("/")[-1] for c in CASES])
def test_recorded_objects_get_their_health(case: dict[str, Any]) -> None:
    obj = yaml.safe_load((ARGOCD / case["inputPath"]).read_text())
    assert obj["kind"] == "BlockPull" and obj["metadata"]["uid"], "a real object"
    assert health(obj) == case["healthStatus"]


def test_every_argo_cd_health_the_check_can_give_is_covered() -> None:
    assert {c["healthStatus"]["status"] for c in CASES} == {"Progressing", "Suspended", "Healthy", "Degraded"}


def test_the_runtime_is_lua_51_without_string_math_io_debug_coroutine() -> None:
    probe = """
    return {status = "Healthy", message = _VERSION .. " " .. type(string) .. type(math) .. type(io)
      .. type(debug) .. type(coroutine) .. " " .. type(table) .. type(os.time) .. type(os.exit)
      .. type(require)}
    """
    assert ArgoLua().run(probe, {})["message"] == "Lua 5.1 nilnilnilnilnil tablefunctionnilfunction"


@pytest.mark.parametrize(
    "use",
    [
        'string.format("%s", "x")',  # the library
        '("Completed"):lower()',  # a string method (the string metatable)
        'string.find("ab", "b")',
        "math.floor(1.5)",
        'os.getenv("HOME")',  # Argo CD's os has time and date only
    ],
)
def test_a_check_that_touches_string_fails_here_as_in_argo_cd(use: str) -> None:
    # The same check with one forbidden call at its top: it must not pass these tests.
    script = f"local _ = {use}\n" + HEALTH_LUA.read_text()
    with pytest.raises(lua51.LuaError):
        health({"status": {"phase": "Completed"}}, script)


def test_argocd_cm_patch_carries_the_check_verbatim() -> None:
    patch = yaml.safe_load((ARGOCD / "argocd-cm-patch.yaml").read_text())
    assert patch["data"] == {"resource.customizations.health.blockpull.dev_BlockPull": HEALTH_LUA.read_text()}
