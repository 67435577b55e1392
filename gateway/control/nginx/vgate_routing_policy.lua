-- Which engine a generation request goes to: the one that already holds the longest
-- part of its prompt in its prefix cache, unless that engine is loaded beyond its
-- bounded share; a session (X-Session-Id) keeps to its engine the same way.
--
-- Pure functions, no nginx: the glue (vgate_routing.lua) reads requests and nginx's
-- shared memory and hands the facts in; tests/unit/test_routing_policy.py calls these
-- through LuaJIT.
--
-- What is taken from whom:
--   * Prompt blocks as chained hashes, each engine's blocks remembered approximately,
--     the longest run of leading blocks an engine holds as its score: llm-d's
--     prefix-cache scorer (its endpoint picker keeps block hashes per pod the same way;
--     vLLM's own prefix cache is a chain of block hashes too).
--   * Prefer the best match unless the load is out of balance: SGLang's cache-aware
--     router. Its balance test (absolute and relative thresholds) is replaced here
--     by consistent hashing's bounded loads (Mirrokni et al., 2018; HAProxy's
--     hash-balance-factor): an engine takes a request only while its in-flight
--     count stays within `factor` times the mean, rounded up, so no engine is swamped
--     and the bound holds whatever the traffic.
--   * X-Session-Id: the vLLM Router's session header.
--   * A LoRA adapter's name is the chain's first block, so an engine that served the
--     adapter (and so has it loaded) matches where others do not.

local bit = require("bit")

local M = {}

M.BLOCK_CHARS = 256 -- about 64 tokens: finer than that buys nothing (vLLM caches whole blocks)
M.MAX_BLOCKS = 128 -- the first 32 KiB of a prompt decide
M.FACTOR = 1.1 -- bounded-load factor: HAProxy's default 1.25 cost TTFT here (README)
M.THRESHOLD = 0.25 -- the share of a prompt an engine must hold to draw it
M.MAX_TRACKED = 31 -- replicas 0-30 have a bit in a block's mask; the rest route by load

-- Routes whose requests fill an engine's prefix cache, and so are routed by prefix.
M.GENERATION_ROUTES = {
    ["/v1/chat/completions"] = true,
    ["/v1/completions"] = true,
    ["/v1/responses"] = true,
    ["/v1/messages"] = true,
    ["/inference/v1/generate"] = true,
}

local function add(parts, value)
    if type(value) == "string" then
        parts[#parts + 1] = value
    elseif type(value) == "number" then
        parts[#parts + 1] = tostring(value)
    end
end

-- A message's content: a string, or parts (text, and media by their URL's ends, so a
-- 2 MB data: URL costs no more than a link).
local function add_content(parts, content)
    if type(content) ~= "table" then
        add(parts, content)
        return
    end
    for _, part in ipairs(content) do
        if type(part) == "table" then
            add(parts, part.text)
            for _, key in ipairs({ "image_url", "input_audio", "video_url", "audio_url" }) do
                local media = part[key]
                local url = type(media) == "table" and (media.url or media.data) or media
                if type(url) == "string" then
                    parts[#parts + 1] = url:sub(1, 96) .. "#" .. #url .. url:sub(-96)
                end
            end
        else
            add(parts, part)
        end
    end
end

local function add_messages(parts, messages)
    if type(messages) ~= "table" then
        return
    end
    for _, message in ipairs(messages) do
        if type(message) == "table" then
            add(parts, message.role)
            parts[#parts + 1] = ":"
            add_content(parts, message.content)
            parts[#parts + 1] = "\n"
        end
    end
end

-- A prompt: a string, token ids, or a list of prompts (the first decides).
local function add_prompt(parts, prompt)
    if type(prompt) ~= "table" then
        add(parts, prompt)
    elseif type(prompt[1]) == "number" then
        parts[#parts + 1] = table.concat(prompt, ",", 1, math.min(#prompt, M.BLOCK_CHARS * M.MAX_BLOCKS / 2))
    else
        add_prompt(parts, prompt[1])
    end
end

-- The text a request's prompt starts with, in an order that only grows as a
-- conversation does, and the model (or adapter) it names. `body`: the decoded JSON.
-- A request that is not JSON, or names no prompt, has none: it is routed by load.
function M.prompt_of(body)
    if type(body) ~= "table" then
        return nil, nil
    end
    local parts = {}
    add(parts, body.system) -- Anthropic's messages
    add(parts, body.instructions) -- the Responses API's
    add_messages(parts, body.messages)
    if type(body.input) == "table" then
        add_messages(parts, body.input)
    else
        add(parts, body.input)
    end
    add_prompt(parts, body.prompt)
    add_prompt(parts, body.token_ids) -- predict's tokens-in route
    local model = type(body.model) == "string" and body.model or ""
    return table.concat(parts), model
end

-- The chain of block hashes: the adapter first ("" for a model every engine serves
-- from the start), then each whole block of the prompt,
-- each hashed with the one before (a block means something only after its prefix).
-- `hash`: string -> number (nginx's crc32).
function M.blocks(adapter, text, hash)
    local chain = { hash("model:" .. adapter) }
    local count = math.min(math.floor(#text / M.BLOCK_CHARS), M.MAX_BLOCKS)
    for i = 1, count do
        local block = text:sub((i - 1) * M.BLOCK_CHARS + 1, i * M.BLOCK_CHARS)
        chain[i + 1] = hash(chain[i] .. ":" .. block)
    end
    return chain
end

-- How many leading blocks each engine holds. `holders(h)`: the bitmask of engines
-- that were sent block `h` (bit r: replica r). Returns {replica = blocks}, and the
-- holders of each block walked (for remember()).
function M.match(chain, holders, replicas)
    local alive = 0
    for _, r in ipairs(replicas) do
        if r < M.MAX_TRACKED then
            alive = bit.bor(alive, bit.lshift(1, r))
        end
    end
    local matched, seen = {}, {}
    for i, h in ipairs(chain) do
        local mask = holders(h) or 0
        seen[i] = mask
        alive = bit.band(alive, mask)
        if alive == 0 then
            break
        end
        for _, r in ipairs(replicas) do
            if r < M.MAX_TRACKED and bit.band(alive, bit.lshift(1, r)) ~= 0 then
                matched[r] = i
            end
        end
    end
    return matched, seen
end

-- The blocks to write down as now held by `replica` too: {hash, new mask} pairs, for
-- blocks whose mask lacks it. `seen[i]`: the mask match() read (nil past its walk).
function M.remember(chain, seen, replica, holders)
    local writes = {}
    if replica >= M.MAX_TRACKED then
        return writes
    end
    local own = bit.lshift(1, replica)
    for i, h in ipairs(chain) do
        local mask = seen[i]
        if mask == nil then
            mask = holders(h) or 0
        end
        if bit.band(mask, own) == 0 then
            writes[#writes + 1] = { h, bit.bor(mask, own) }
        end
    end
    return writes
end

-- An engine's claim on a request, from match(): whether it was sent the request's
-- adapter (one it will not have to load), then how many prompt blocks it holds,
-- counted only when they are at least THRESHOLD of the prompt's (SGLang's cache
-- threshold): a short shared system prompt alone does not pull every new conversation
-- to the one engine that has served it so far.
function M.claims(request, replica)
    local held = request.matched[replica] or 0
    local prefix = held - 1
    if prefix < 1 or prefix < M.THRESHOLD * (request.blocks - 1) then
        prefix = 0
    end
    return (request.adapter and held >= 1) and 1 or 0, prefix
end

-- The engine for a request. `replicas`: the ready engines not known to have just
-- failed (ids); `loads`: {replica = requests in flight}; `request`: {matched (from
-- match()), blocks (the chain's length), adapter (its model is not on every engine
-- from the start), pinned (the session's engine, or nil)}; `turn`: a counter that
-- rotates ties. Candidates in order (the session's engine, then the adapter's, then
-- the longest prefix, then the least load), the first within the bound:
-- ceil(factor * (in flight + 1) / engines). The least loaded engine is always within
-- it, so some engine is always chosen.
function M.choose(replicas, loads, request, turn, factor)
    local n = #replicas
    if n == 0 then
        return nil
    end
    factor = factor or M.FACTOR
    local total = 0
    for _, r in ipairs(replicas) do
        total = total + (loads[r] or 0)
    end
    local bound = math.ceil(factor * (total + 1) / n)
    local order = {}
    for i, r in ipairs(replicas) do
        local model, prefix = M.claims(request, r)
        order[i] = {
            r = r,
            pinned = r == request.pinned and 1 or 0,
            model = model,
            prefix = prefix,
            load = loads[r] or 0,
            rank = (i - 1 - (turn or 0)) % n,
        }
    end
    table.sort(order, function(a, b)
        for _, key in ipairs({ "pinned", "model", "prefix" }) do
            if a[key] ~= b[key] then
                return a[key] > b[key]
            end
        end
        if a.load ~= b.load then
            return a.load < b.load
        end
        return a.rank < b.rank
    end)
    for _, c in ipairs(order) do
        if c.load + 1 <= bound then
            return c.r
        end
    end
    return order[#order].r -- not reached: the least loaded is within the bound
end

-- "0=127.0.0.1:8001@alpha 1=127.0.0.1:8002@beta" (the ready engines and their models,
-- as the upstream file lists them) -> {ids}, {id = {host, port}}, {id = model}.
function M.parse_engines(spec)
    local ids, addresses, models = {}, {}, {}
    for id, host, port, model in (spec or ""):gmatch("(%d+)=([^%s:]+):(%d+)@(%S*)") do
        id = tonumber(id)
        ids[#ids + 1] = id
        addresses[id] = { host, tonumber(port) }
        models[id] = model
    end
    return ids, addresses, models
end

-- The served models, from the file `vgate serve` (or an update) wrote: {models = {{name,
-- names}}, adapters = {--lora-modules}, lora = --enable-lora} -> what resolve() reads.
function M.model_table(settings)
    local t = { by_name = {}, first = nil, lora = settings.lora == true, everywhere = {} }
    for _, model in ipairs(settings.models or {}) do
        t.first = t.first or model.name
        for _, name in ipairs(model.names) do
            t.by_name[name] = model.name
        end
    end
    for _, name in ipairs(settings.adapters or {}) do
        t.everywhere[name] = true
    end
    return t
end

-- The model a request's `model` names: its served model's name, and the adapter it
-- names ("" for none). Empty or absent: the first model, as vLLM serves its own model
-- under an empty name. Another name is an adapter of the first model's engines when the
-- engines run LoRA (vLLM's resolver loads it), else nothing: nil (a 404).
function M.resolve(t, name)
    if type(name) ~= "string" or name == "" then
        return t.first, ""
    end
    local model = t.by_name[name]
    if model ~= nil then
        return model, ""
    end
    if t.lora then
        return t.first, t.everywhere[name] and "" or name
    end
    return nil, nil
end

-- Only the engines of `model` among `ids` (in their order).
function M.of_model(ids, models, model)
    local out = {}
    for _, r in ipairs(ids) do
        if models[r] == model then
            out[#out + 1] = r
        end
    end
    return out
end

return M
