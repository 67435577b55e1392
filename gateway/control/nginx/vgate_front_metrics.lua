-- The front door's requests, counted where every request passes, in nginx's shared
-- memory: by surface (openai, vertex, health, metrics, other), route and status, with
-- their latency and time to the first byte of the answer (for a stream: to its first
-- event). Routes and surfaces come from bounded nginx maps (nginx.conf.j2). The gateway
-- reads the counts from the internal listener and renders them for /metrics
-- (gateway/front_metrics.py). Per request: a handful of shared-dict increments.

local M = {}

local counts = ngx.shared.vgate_front
local LATENCY = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600 }
local FIRST_BYTE = { 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60 }

local function le(bounds, value)
    for i = 1, #bounds do
        if value <= bounds[i] then
            return bounds[i]
        end
    end
    return "+Inf"
end

local function observe(name, bounds, key, value)
    counts:incr(name .. "|" .. key .. "|" .. le(bounds, value), 1, 0)
    counts:incr(name .. "_sum|" .. key, value, 0)
end

-- body_filter: the moment the first byte of the answer leaves.
function M.first_byte()
    local ctx = ngx.ctx
    if ctx.vgate_first_byte == nil and ngx.arg[1] ~= "" then
        ctx.vgate_first_byte = ngx.now() - ngx.req.start_time()
    end
end

-- log: once per request, whatever answered it (an engine, a gateway, nginx itself).
function M.log()
    local var = ngx.var
    local key = var.vgate_surface .. "|" .. var.vgate_route
    counts:incr("requests|" .. key .. "|" .. var.status, 1, 0)
    observe("latency", LATENCY, key, tonumber(var.request_time) or 0)
    local first = ngx.ctx.vgate_first_byte
    if first ~= nil then
        observe("first_byte", FIRST_BYTE, key, first)
    end
end

-- The counts, a "name|surface|route|label value" line each, after the buckets' bounds.
function M.exposition()
    ngx.header.content_type = "text/plain"
    local lines = {
        "bounds|latency " .. table.concat(LATENCY, ","),
        "bounds|first_byte " .. table.concat(FIRST_BYTE, ","),
    }
    for _, key in ipairs(counts:get_keys(0)) do
        lines[#lines + 1] = key .. " " .. tostring(counts:get(key))
    end
    ngx.print(table.concat(lines, "\n"), "\n")
end

return M
