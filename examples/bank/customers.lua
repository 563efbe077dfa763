-- bank.customers: a plain table behind a repository (no events of its own).
local qx = require "qx"

local customers = qx.repository{
    table = "bank_customers",
    filterable = { "email", "name" },
    sortable = { "name", "created_at" },
    -- signs keyset cursors; production sets QX_CURSOR_KEY (the same on every instance)
    cursor_key = os.getenv("QX_CURSOR_KEY") or "bank example key, not a secret",
}

local M = { repository = customers }

-- add(db, name, email) -> the new customer's id, or nil, err
function M.add(db, name, email)
    return db:unit_of_work(function(uow)
        local c = { id = qx.uuid(), name = name, email = email }
        assert(uow:repo(customers):add(c))
        return c.id
    end, { context = { user_id = "bank" } })
end

-- by_name(db, after) -> a keyset page of customers sorted by name: { items, next_cursor, has_next }
function M.by_name(db, after)
    return customers:reader(db):page{ limit = 10, sort = {{ "name", "asc" }}, after = after }
end

return M
