-- Argo CD health check for blockpull.dev/BlockPull.
--
-- Install as the argocd-cm key `resource.customizations.health.blockpull.dev_BlockPull`
-- (deploy/argocd/argocd-cm-patch.yaml; docs/gitops.md shows how).
--
-- Written for Argo CD's own Lua runtime: Lua 5.1 with only the base, table and package
-- libraries and an `os` holding time/date. There is NO `string` library there (no
-- string.format, no s:lower(), no s:find()): strings are built with `..` only.
--
--   Pending, Running                     -> Progressing (message: the reason, or the progress)
--   Pending/Paused, Paused/Paused        -> Suspended   (paused by the user: spec.paused)
--   Paused/PausedOnError*                -> Degraded    (QEMU stopped the job after an I/O
--                                                        error; only a person can retry it)
--   Completed                            -> Healthy
--   Failed                               -> Degraded    (message: reason and QEMU's text)
--   no status yet                        -> Progressing (the node agent has not reported)
--
-- The outcome (Completed/Failed condition True) is final, so it wins over everything else,
-- including a spec edit the agent has not observed yet.

local function text(value)
  if value == nil then
    return ""
  end
  return tostring(value)
end

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function isTrue(status, kind)
  local c = condition(status, kind)
  return c ~= nil and c.status == "True"
end

local hs = {}
local status = obj.status

if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the node agent to report (no status yet)"
  return hs
end

local phase = text(status.phase)
local reason = text(status.reason)
local message = text(status.message)

if isTrue(status, "Completed") or phase == "Completed" then
  hs.status = "Healthy"
  hs.message = message
  return hs
end

if isTrue(status, "Failed") or phase == "Failed" then
  hs.status = "Degraded"
  hs.message = reason .. ": " .. message
  return hs
end

if reason == "Paused" and (phase == "Paused" or phase == "Pending") then
  hs.status = "Suspended"
  if status.progress ~= nil then
    hs.message = "Paused by spec.paused at " .. text(status.progress)
  else
    hs.message = "Paused by spec.paused: " .. message
  end
  return hs
end

if phase == "Paused" then
  hs.status = "Degraded"
  hs.message = reason .. ": " .. message
  return hs
end

hs.status = "Progressing"
if phase == "Running" and status.progress ~= nil then
  hs.message = reason .. ": " .. text(status.progress) .. " (" .. message .. ")"
else
  hs.message = phase .. "/" .. reason .. ": " .. message
end
return hs
