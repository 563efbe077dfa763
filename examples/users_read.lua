-- The read side of the users example, through qx.repository: a filtered, sorted list page,
-- paging through with signed cursors, and a rename that loses to a concurrent one (a version
-- conflict, returned - not raised).
--
-- Run on its own:  QX_DB__URL=postgresql://... lua5.4 examples/users_read.lua
-- or from the demo: require("users_read").run(db, print)
package.path = "examples/?.lua;" .. package.path
local qx = require "qx"
local register = require "register_user"

local required_as = ... -- the module name when required, nil when run as a script
local _M = {}

-- The description: which columns a client may filter and sort on, tenancy, soft delete.
-- Keyset cursors are signed with QX_CURSOR_KEY; a service sets it (the same on every instance)
-- so that cursors survive restarts. Without it this example signs with a key of its own run.
local function users(db)
    return qx.repository{
        table = "users", entity = register.User,
        filterable = { "email", "name", "is_active" }, sortable = { "created_at", "email", "name" },
        tenanted = true, soft_delete = true,
        cursor_key = not db.settings.cursor_key and (qx.uuid() .. qx.uuid()) or nil,
    }
end
_M.users = users

function _M.run(db, say)
    say = say or print
    assert(register.setup(db))
    local repo_desc = users(db)

    -- a tenant of our own with a few users, registered through the write path
    local tenant = qx.uuid()
    local ctx = { tenant_id = tenant, user_id = "admin@example.com" }
    local tag = qx.uuid():sub(-8)
    for _, name in ipairs({ "Ada Lovelace", "Grace Hopper", "Alan Turing", "Edsger Dijkstra",
                            "Barbara Liskov" }) do
        local email = (name:lower():gsub("%W+", ".")) .. "." .. tag .. "@example.com"
        assert(register.register_user(db, { email = email, name = name }, ctx))
    end

    -- a list page: a filter and a sort, with the total
    local page = assert(db:unit_of_work(function(uow)
        return uow:repo(repo_desc):list{ filters = {{ "email", "ends_with", "." .. tag .. "@example.com" }},
                                         sort = {{ "name", "desc" }}, page = 1, page_size = 3 }
    end, { context = ctx }))
    say(("list: page %d of %d (%d users), sorted by name descending:"):format(page.page,
        page.pages, page.total))
    for _, u in ipairs(page.items) do say("  " .. u.name .. " <" .. u.email .. ">") end

    -- keyset pages: a reader (no transaction) and opaque, signed cursors
    local reader = repo_desc:reader(db, { tenant_id = tenant })
    local cursor, n = nil, 0
    repeat
        local p = assert(reader:page{ limit = 2, sort = { "name" }, after = cursor })
        n = n + 1
        local names = {}
        for i, u in ipairs(p.items) do names[i] = u.name end
        say(("keyset page %d: %s%s"):format(n, table.concat(names, ", "),
            p.next_cursor and ("   next cursor " .. p.next_cursor:sub(1, 24) .. "...") or "   (last)"))
        cursor = p.next_cursor
    until not cursor

    -- an edited cursor is refused
    local first = assert(reader:page{ limit = 2, sort = { "name" } }).next_cursor
    local edited = first:sub(1, 5) .. (first:sub(6, 6) == "A" and "B" or "A") .. first:sub(7)
    local _, bad = reader:page{ limit = 2, sort = { "name" }, after = edited }
    say("an edited cursor -> " .. tostring(bad))

    -- a rename that loses: two units of work load version 1; the first saves, the second gets
    -- a conflict back and can tell the user to reload
    local ada = assert(reader:list{ filters = {{ "name", "eq", "Ada Lovelace" }} }).items[1]
    local outcome = assert(db:unit_of_work(function(uow)
        local repo = uow:repo(repo_desc)
        local mine = assert(repo:get(ada.id))
        assert(db:unit_of_work(function(other)
            local theirs = assert(other:repo(repo_desc):get(ada.id))
            theirs.name = "Augusta Ada King"
            return other:repo(repo_desc):save(theirs)
        end, { context = ctx }))
        mine.name = "Ada King"
        local saved, err = repo:save(mine)
        return saved and "saved" or tostring(err)
    end, { context = ctx }))
    say("rename with a stale version -> " .. outcome)
    local now = assert(reader:get(ada.id))
    say(("the row kept the first rename: %s (version %d)"):format(now.name, now.version))

    -- a field outside the allow-list raises instead of being ignored
    local ok, why = pcall(reader.list, reader, { filters = {{ "created_by", "eq", "x" }} })
    say("filter on a field that is not filterable -> " .. (ok and "accepted?!" or tostring(why)))
    return tenant
end

if not required_as then
    local db = assert(qx.connect())
    assert(qx.migrate(db))
    _M.run(db, print)
    db:close()
end

return _M
