-- nginx's side of prefix-aware routing (the choice itself: vgate_routing_policy.lua).
--
--   prepare()  access phase: reads the request's body (nginx then sends the same bytes
--              on): the model it names (an unknown one is a 404 here, a model with no
--              engine ready a 503) and its prompt, as block hashes; reads X-Session-Id.
--   balance()  the engines upstream's balancer: picks the engine among the request's
--              model's, remembers which
--              blocks it was sent, counts the request in flight on it; on a retry
--              (the engine failed before answering) picks another and passes over
--              the failed one for FAIL_S, as max_fails=1 fail_timeout=5s did.
--   done()     log phase: the request is no longer in flight.
--   status()   the internal listener's /vgate/routing: what is in flight where.
--
-- Shared memory: vgate_prefixes (block hash -> mask of engines sent it; least recently
-- used evicted when full), vgate_routing (in-flight counts, recent failures), and
-- vgate_sessions (X-Session-Id -> engine, an hour, least recently used evicted).
-- The engine a request counts on lives in $vgate_engine: ngx.ctx does not survive the
-- error_page redirects a failed request takes, variables do.

local policy = require("vgate_routing_policy")
local balancer = require("ngx.balancer")
local cjson = require("cjson.safe").new()

cjson.decode_max_depth(32)

local M = {}

local prefixes = ngx.shared.vgate_prefixes
local state = ngx.shared.vgate_routing
local sessions = ngx.shared.vgate_sessions -- apart: clients' ids never evict the counts
local MAX_BODY = 1048576 -- larger bodies route by load: decoding them would hold the worker
local FAIL_S = 5
local SESSION_S = 3600
local MAX_SESSION_ID = 256

local engines = { spec = false }
local served = policy.model_table({}) -- the served models (configure())

-- Each time nginx loads its config: the served models' names, the operator's
-- --lora-modules and whether the engines run LoRA, from the file `vgate serve` (or an
-- update of the models) wrote. A request for another model names an adapter that only
-- the engines it was sent to have loaded.
function M.configure(path)
    local file = assert(io.open(path))
    local settings = assert(cjson.decode(file:read("*a")))
    file:close()
    served = policy.model_table(settings)
end

-- The ready engines, from the upstream file's map (parsed once per nginx config).
local function ready()
    local spec = ngx.var.vgate_ready_engines
    if spec ~= engines.spec then
        local ids, addresses, models = policy.parse_engines(spec)
        engines = { spec = spec, ids = ids, addresses = addresses, models = models }
    end
    return engines.ids, engines.addresses, engines.models
end

-- An answer from the access phase, in the shape of the OpenAI API's errors (vLLM's).
local function refuse(status, kind, message)
    ngx.status = status
    ngx.header.content_type = "application/json"
    if status == 503 then
        ngx.header["Retry-After"] = "5"
    end
    ngx.print(cjson.encode({
        error = { message = message, type = kind, param = "model", code = status },
    }))
    return ngx.exit(ngx.HTTP_OK)
end

-- The request's body, decoded; nil when there is none, it is too large, or not JSON.
local function body_json()
    ngx.req.read_body()
    local body = ngx.req.get_body_data()
    if body == nil then
        local path = ngx.req.get_body_file() -- nginx kept a larger body in a file
        local size = tonumber(ngx.var.content_length)
        if path == nil or size == nil or size > MAX_BODY then
            return nil
        end
        local file = io.open(path, "rb")
        if file == nil then
            return nil
        end
        body = file:read("*a")
        file:close()
    end
    if #body > MAX_BODY then
        return nil
    end
    return cjson.decode(body)
end

local function held(h)
    return prefixes:get(h)
end

local function release()
    local counted = tonumber(ngx.var.vgate_engine)
    if counted ~= nil then
        state:incr("load:" .. counted, -1, 0)
        ngx.var.vgate_engine = ""
    end
    return counted
end

function M.prepare()
    local ctx = ngx.ctx
    local session = ngx.var.http_x_session_id
    if session ~= nil and session ~= "" and #session <= MAX_SESSION_ID then
        ctx.vgate_session = session
    end
    local body = ngx.req.get_method() == "POST" and body_json() or nil
    local name = type(body) == "table" and body.model or nil
    local model, adapter = policy.resolve(served, name)
    if model == nil then
        return refuse(404, "NotFoundError", "The model `" .. tostring(name) .. "` does not exist.")
    end
    ctx.vgate_model = model
    local ids, _, models = ready()
    if #policy.of_model(ids, models, model) == 0 then
        return refuse(503, "ServiceUnavailableError", "no engine of model `" .. model
            .. "` is ready yet; retry shortly")
    end
    if not policy.GENERATION_ROUTES[ngx.var.uri] or type(body) ~= "table" then
        return
    end
    local text = policy.prompt_of(body)
    if text ~= nil then
        ctx.vgate_adapter = adapter ~= ""
        ctx.vgate_chain = policy.blocks(model .. "/" .. adapter, text, ngx.crc32_long)
    end
end

function M.balance()
    local ctx = ngx.ctx
    local all, addresses, models = ready()
    local ids = policy.of_model(all, models, ctx.vgate_model or served.first)
    local failed = release() -- set on a retry: that engine failed this request
    if failed ~= nil then
        state:set("failed:" .. failed, true, FAIL_S)
    end
    local candidates, others = {}, {}
    for _, r in ipairs(ids) do
        if r ~= failed then
            others[#others + 1] = r
            if not state:get("failed:" .. r) then
                candidates[#candidates + 1] = r
            end
        end
    end
    if #candidates == 0 then
        candidates = others -- every engine failed lately: try one rather than none
    end
    if #candidates == 0 then
        -- None of the model's engines is ready (any more): a 502, answered as nginx's
        -- 503 for no engine, never another model's engine.
        return ngx.exit(502)
    end
    local chain = failed == nil and ctx.vgate_chain or nil
    local matched, seen = {}, {}
    if chain ~= nil then
        matched, seen = policy.match(chain, held, candidates)
    end
    local session = ctx.vgate_session
    local pinned = session and sessions:get(session)
    local loads = {}
    for _, r in ipairs(candidates) do
        loads[r] = state:get("load:" .. r) or 0
    end
    local request = {
        matched = matched,
        blocks = chain and #chain or 1,
        adapter = ctx.vgate_adapter,
        pinned = pinned,
    }
    local replica = policy.choose(candidates, loads, request, state:incr("turn", 1, 0))
    if chain ~= nil then
        for _, write in ipairs(policy.remember(chain, seen, replica, held)) do
            prefixes:set(write[1], write[2])
        end
    end
    if session ~= nil and failed == nil then
        local keep = pinned ~= nil and loads[pinned] ~= nil
        sessions:set(session, keep and pinned or replica, SESSION_S)
    end
    state:incr("load:" .. replica, 1, 0)
    ngx.var.vgate_engine = replica
    local address = addresses[replica]
    local ok, err = balancer.set_current_peer(address[1], address[2])
    if not ok then
        ngx.log(ngx.ERR, "vgate routing: ", err)
        release()
    end
end

function M.done()
    release()
end

function M.status()
    local ids, _, models = ready()
    local loads, of = {}, {}
    for _, r in ipairs(ids) do
        loads[tostring(r)] = state:get("load:" .. r) or 0
        of[tostring(r)] = models[r]
    end
    ngx.header.content_type = "application/json"
    ngx.print(cjson.encode({ in_flight = loads, models = of }))
end

return M
