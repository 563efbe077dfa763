--- Internal to qx.store.repository: repo:each(opts, fn), every matching row in order through a
-- server-side cursor, holding one batch at a time.
local base = require "qx.store.repository.base"
local query = require "qx.store.repository.query"

local type = type
local error = error
local setmetatable = setmetatable
local unpack = table.unpack or unpack
local is_int, check_opts, ready, map_row = base.is_int, base.check_opts, base.ready, base.map_row
local new_query, listing_where = query.new_query, query.listing_where
local order_by, sort_of = query.order_by, query.sort_of
local MAX_BATCH_SIZE = base.MAX_BATCH_SIZE
local Repo = base.Repo

local cursor_counter = setmetatable({}, { __mode = "k" })
local EACH_OPTS = { filters = true, where = true, sort = true, include_deleted = true,
                    batch_size = true }

--- Calls fn(entity) for every matching row, in order, holding at most batch_size rows (default
-- 500) at a time: a server-side cursor inside the unit of work's transaction (a reader opens
-- its own). fn returning false stops early.
---@param opts table|nil { filters, where, sort, include_deleted, batch_size = 500 }
---@param fn fun(entity: table): boolean?
---@return integer|nil count
---@return qx.Error? err
function Repo:each(opts, fn)
    if type(opts) == "function" and fn == nil then opts, fn = nil, opts end
    if type(fn) ~= "function" then error("each: expected a function", 2) end
    opts = check_opts(opts, EACH_OPTS, "each")
    local batch = opts.batch_size or base.EACH_BATCH_SIZE
    if not is_int(batch, 1, MAX_BATCH_SIZE) then
        error("each: batch_size must be an integer from 1 to " .. MAX_BATCH_SIZE, 2)
    end
    if not self.uow then
        local d = self.d
        return self.db:unit_of_work(function(uow)
            local n, e = base.bind(d, uow):each(opts, fn)
            if not n then error(e, 0) end
            return n
        end, { context = self.ctx })
    end
    local c, e = ready(self)
    if not c then return nil, e end
    local q = new_query(self, c)
    local w = listing_where(self, c, q, opts)
    local keys = sort_of(self, c, opts)
    local uow = self.uow
    local k = (cursor_counter[uow] or 0) + 1
    cursor_counter[uow] = k
    local name = "qx_each_" .. k
    local ok
    ok, e = uow:queue("DECLARE " .. name .. " NO SCROLL CURSOR FOR SELECT " .. c.select .. " FROM "
                      .. c.qtable .. " WHERE " .. w .. " ORDER BY " .. order_by(c, keys),
                      unpack(q.params, 1, q.n))
    if not ok then return nil, e end
    local fetch = "FETCH " .. batch .. " FROM " .. name
    local d, n = self.d, 0
    while true do
        local rows
        rows, e = uow:rows(fetch)
        if not rows then return nil, e end
        local got, stop = #rows, false
        for i = 1, got do
            local row = rows[i]
            rows[i] = nil -- the batch is the only thing held
            n = n + 1
            if fn(map_row(d, row)) == false then stop = true break end
        end
        if stop or got < batch then break end
    end
    uow:queue("CLOSE " .. name)
    return n
end
