-- Argo CD health check for dapo.dev/DAPORun (resource.customizations.health.dapo.dev_DAPORun).
-- Reads what the DAPO operator writes: status.observedGeneration, status.phase
-- (Pending | Starting | Running | Suspended | Succeeded | Failed), status.conditions and
-- status.message. A run that trains is Healthy (it does what the spec asks, like a Deployment
-- that is up); a failed run is Degraded; a suspended one is Suspended.
local hs = {}

local function condition(status, wanted)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == wanted then
      return c
    end
  end
  return nil
end

local function progress(status)
  local text = ""
  if status.step ~= nil then
    text = "step " .. tostring(status.step)
    if status.totalSteps ~= nil then
      text = text .. "/" .. tostring(status.totalSteps)
    end
  end
  if status.message ~= nil and status.message ~= "" then
    if text ~= "" then
      text = text .. ": "
    end
    text = text .. status.message
  end
  return text
end

if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the DAPO operator to report a phase"
  return hs
end

local status = obj.status
local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "The operator has not yet acted on generation " .. tostring(generation)
  return hs
end

local failed = condition(status, "Failed")
if status.phase == "Failed" or (failed ~= nil and failed.status == "True") then
  hs.status = "Degraded"
  local why = progress(status)
  if failed ~= nil and failed.message ~= nil and failed.message ~= "" then
    why = failed.message
  end
  hs.message = "Failed: " .. why
  return hs
end

if status.phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "Succeeded: " .. progress(status)
  return hs
end

if status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "Suspended (spec.suspend: true); checkpoints are kept"
  return hs
end

if status.phase == "Running" then
  hs.status = "Healthy"
  hs.message = "Running: " .. progress(status)
  return hs
end

-- Pending, Starting, or a phase this script does not know yet.
hs.status = "Progressing"
hs.message = status.phase .. ": " .. progress(status)
return hs
