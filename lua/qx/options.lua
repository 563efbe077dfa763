-- The one option checker of the Lua layer (internal). Every function that takes an option table
-- passes it here: a name it does not know is a misuse, raised at the caller's line with the
-- names it knows, since a misspelt option would otherwise be dropped without a word.
--
-- "The caller" is the first frame on the stack outside qx's own Lua files, however many qx
-- layers lie between (es:append inside a unit of work, qx.relay opening a NATS connection).
local error = error
local type = type
local pairs = pairs
local tostring = tostring
local sort = table.sort
local concat = table.concat
local getinfo = debug.getinfo
local setmetatable = setmetatable

local _M = {}

-- the folder of qx's Lua files, as debug.getinfo names it ("@/path/to/qx/")
local HOME = getinfo(1, "S").source:match("^(@.*[/\\])options%.lua$")

-- The level, for error() called by the function that calls level_outside(), of the first frame
-- outside qx's Lua files (C frames skipped).
local function level_outside()
    local lvl = 3 -- 1 is this function, 2 the function that raises
    while true do
        local info = getinfo(lvl, "S")
        if not info then return 2 end
        local src = info.source
        if src ~= "=[C]" and not (HOME and src:sub(1, #HOME) == HOME) then return lvl - 1 end
        lvl = lvl + 1
    end
end

-- raise(message): raises message at the caller's line (see above)
function _M.raise(message)
    error(message, level_outside())
end

local NO_OPTIONS = setmetatable({}, { __newindex = function() error("read-only", 2) end })
_M.NO_OPTIONS = NO_OPTIONS

-- known: a set { name = true } (listed sorted) or a list { "name", ... } (listed in its order)
local function names(known)
    if known[1] ~= nil then return concat(known, ", ") end
    local list = {}
    for k in pairs(known) do list[#list + 1] = tostring(k) end
    if list[1] == nil then return "none" end
    sort(list)
    return concat(list, ", ")
end

-- a long list's names as a set, made once per list (long lists are the callers' constants; a
-- short one, perhaps made per call, is searched instead)
local sets = setmetatable({}, { __mode = "k" })

local function set_of(known)
    if known[1] == nil or known[5] == nil then return nil end
    local set = sets[known]
    if set == nil then
        set = {}
        for i = 1, #known do set[known[i]] = true end
        sets[known] = set
    end
    return set
end

-- check(opts, known, what) -> opts (a read-only empty table when opts is nil)
-- Raises "what: options must be a table, got T" or "what: unknown option 'k' (known: ...)".
function _M.check(opts, known, what)
    if opts == nil then return NO_OPTIONS end
    if type(opts) ~= "table" then
        error(what .. ": options must be a table, got " .. type(opts), level_outside())
    end
    local set = set_of(known) or known
    local short = set == known and known[1] ~= nil
    for k in pairs(opts) do
        local ok
        if short then
            ok = k == known[1] or k == known[2] or k == known[3] or k == known[4]
        else
            ok = set[k] ~= nil
        end
        if not ok then
            error(what .. ": unknown option '" .. tostring(k) .. "' (known: " .. names(known)
                  .. ")", level_outside())
        end
    end
    return opts
end

return _M
