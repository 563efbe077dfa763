local core = require "qx.core"
local event = require "qx.model.event"
local aggregate = require "qx.model.aggregate"

local UUID = "^%x%x%x%x%x%x%x%x%-%x%x%x%x%-7%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x$"


describe("qx.model.aggregate", function()
    local Registered = event.define("identity.user.registered", { integration = true })
    local Renamed = event.define("identity.user.renamed")

    local User = aggregate.define("User")

    function User.register(email, name)
        local u = User.new{ email = email, name = name }
        u:record(Registered{ email = email })
        return u
    end

    function User:rename(name)
        self.name = name
        self:record(Renamed{ name = name })
    end

    local function keys(t)
        local out = {}
        for k in pairs(t) do out[#out + 1] = k end
        table.sort(out)
        return out
    end

    describe("define", function()
        it("makes a class that knows its aggregate type", function()
            assert.equal("User", User.aggregate_type)
            assert.is_true(aggregate.is_class(User))
            assert.equal("User", aggregate.type_of(User))
            assert.equal("aggregate User", tostring(User))
        end)

        it("accepts dotted identifiers", function()
            assert.equal("billing.Account", aggregate.define("billing.Account").aggregate_type)
            assert.equal("_Internal2", aggregate.define("_Internal2").aggregate_type)
        end)

        it("rejects names that are not identifiers", function()
            for _, name in ipairs({ "", "1User", "a b", "a-b", "a.", ".a", "a..b", "a.1b", "a*" }) do
                assert.has_error(function() aggregate.define(name) end)
            end
            assert.has_error(function() aggregate.define(nil) end,
                "aggregate name must be a string, got nil")
            assert.has_error(function() aggregate.define("a b") end,
                "aggregate name \"a b\" must be identifiers joined by '.' (letters, digits, '_')")
            assert.has_error(function() aggregate.define(string.rep("A", 256)) end)
        end)
    end)

    describe("new", function()
        it("copies the fields and defaults id to a UUID and version to 0", function()
            local fields = { email = "ada@example.com" }
            local u = User.new(fields)
            assert.equal("ada@example.com", u.email)
            assert.matches(UUID, u.id)
            assert.equal(0, u.version)
            assert.is_nil(fields.id)
            u.email = "x"
            assert.equal("ada@example.com", fields.email)
        end)

        it("keeps a given id and version", function()
            local u = User{ id = "u-1", version = 7 }
            assert.equal("u-1", u.id)
            assert.equal(7, u.version)
            assert.equal(42, User.new{ id = 42 }.id)
        end)

        it("treats core.null as no id", function()
            assert.matches(UUID, User.new{ id = core.null }.id)
        end)

        it("holds no bookkeeping in the instance's own fields", function()
            local u = User.register("ada@example.com", "Ada")
            assert.same({ "email", "id", "name", "version" }, keys(u))
        end)

        it("gives instances the class methods and a readable tostring", function()
            local u = User{ id = "u-1", version = 3 }
            u:rename("Bob")
            assert.equal("Bob", u.name)
            assert.equal(User, getmetatable(u))
            assert.equal("User(u-1) v3", tostring(u))
        end)

        it("lets the class override tostring", function()
            local Thing = aggregate.define("Thing")
            function Thing:__tostring() return "thing " .. self.id end
            assert.equal("thing t1", tostring(Thing{ id = "t1" }))
        end)

        it("rejects fields that would hide a method", function()
            assert.has_error(function() User.new{ record = true } end,
                "User: field 'record' would hide the method User:record()")
            assert.has_error(function() User.new{ rename = "x" } end,
                "User: field 'rename' would hide the method User:rename()")
        end)

        it("rejects bad id, version and argument types", function()
            assert.has_error(function() User.new{ id = {} } end,
                "User: id must be a string or a number, got table")
            for _, v in ipairs({ -1, 1.5, "1", 2 ^ 31, math.huge }) do
                assert.has_error(function() User.new{ version = v } end)
            end
            assert.has_error(function() User.new("x") end, "User: fields must be a table, got string")
            assert.has_error(function() User:new{} end,
                "User: call as Class.new{...} or Class{...}, not Class:new{...}")
        end)

        it("reports misuse at the caller's line", function()
            local ok, err = pcall(function() User.new{ id = {} } end)
            assert.is_false(ok)
            assert.matches("aggregate_spec.lua:%d+: User: id", err)
            err = select(2, pcall(function() User{ id = {} } end))
            assert.matches("aggregate_spec.lua:%d+: User: id", err)
        end)
    end)

    describe("is_aggregate / type_of / class_of", function()
        it("recognise instances and nothing else", function()
            local u = User.new()
            assert.is_true(aggregate.is_aggregate(u))
            assert.is_false(aggregate.is_aggregate(User))
            assert.is_false(aggregate.is_aggregate({}))
            assert.is_false(aggregate.is_aggregate("User"))
            assert.equal("User", aggregate.type_of(u))
            assert.is_nil(aggregate.type_of({}))
            assert.equal(User, aggregate.class_of(u))
            assert.is_nil(aggregate.class_of(User))
            assert.is_false(aggregate.is_class(u))
        end)
    end)

    describe("record", function()
        it("queues the event and stamps aggregate_type and aggregate_id", function()
            local u = User.register("ada@example.com", "Ada")
            local pending = u:pending_events()
            assert.equal(1, #pending)
            local ev = pending[1]
            assert.is_true(Registered:is(ev))
            assert.equal("User", ev.aggregate_type)
            assert.equal(u.id, ev.aggregate_id)
        end)

        it("keeps the stamps out of the payload and the envelope", function()
            local u = User.register("ada@example.com")
            local ev = u:pending_events()[1]
            assert.same({ email = "ada@example.com" }, ev:payload())
            assert.is_nil(ev:envelope().aggregate_id)
        end)

        it("leaves stamps that are already set", function()
            local u = User.new()
            local ev = u:record(Renamed{ aggregate_type = "Profile", aggregate_id = "p-1" })
            assert.equal("Profile", ev.aggregate_type)
            assert.equal("p-1", ev.aggregate_id)
        end)

        it("returns the event", function()
            local u = User.new()
            local ev = Renamed{ name = "x" }
            assert.equal(ev, u:record(ev))
        end)

        it("raises for anything that is not an event", function()
            local u = User.new()
            assert.has_error(function() u:record({ event_name = "x" }) end,
                "record: expected an event made by an event class, got table")
            assert.has_error(function() u:record(Renamed) end)
            assert.has_error(function() User.record({}, Renamed{}) end,
                "record: call as aggregate:record(ev)")
        end)

        it("calls the class's __record_hook before queueing", function()
            local Counter = aggregate.define("Counter")
            local Bumped = event.define("counter.bumped")
            local seen = {}
            Counter.__record_hook = function(self, ev)
                seen[#seen + 1] = ev
                assert.equal("Counter", ev.aggregate_type)
                assert.equal(0, #self:pending_events())
                self.n = (self.n or 0) + ev.by
            end
            local c = Counter.new()
            c:record(Bumped{ by = 2 })
            assert.equal(2, c.n)
            assert.equal(1, #seen)
            assert.equal(1, #c:pending_events())
        end)

        it("queues nothing when the hook raises", function()
            local Strict = aggregate.define("Strict")
            Strict.__record_hook = function() error("refused", 0) end
            local s = Strict.new()
            assert.has_error(function() s:record(Renamed{}) end, "refused")
            assert.same({}, s:pending_events())
        end)
    end)

    describe("pull_events / pending_events", function()
        it("pull returns events oldest first and clears the queue", function()
            local u = User.register("ada@example.com")
            u:rename("Ada")
            u:rename("Ada L.")
            local events = u:pull_events()
            assert.equal(3, #events)
            assert.is_true(Registered:is(events[1]))
            assert.equal("Ada", events[2].name)
            assert.equal("Ada L.", events[3].name)
            assert.same({}, u:pull_events())
            assert.same({}, u:pending_events())
        end)

        it("pending returns a copy and keeps the queue", function()
            local u = User.register("ada@example.com")
            local copy = u:pending_events()
            copy[2] = "junk"
            assert.equal(1, #u:pending_events())
            assert.equal(1, #u:pull_events())
        end)

        it("keeps queues per instance", function()
            local a, b = User.register("a@x"), User.new()
            assert.equal(1, #a:pending_events())
            assert.equal(0, #b:pending_events())
        end)

        it("forgets the queue when the instance is collected", function()
            local probe = setmetatable({}, { __mode = "v" })
            local function make()
                local u = User.register("gone@x")
                probe[1] = u:pending_events()[1]
            end
            make()
            collectgarbage()
            collectgarbage()
            assert.is_nil(probe[1])
        end)

        it("raise when not called as methods", function()
            assert.has_error(function() User.pull_events({}) end,
                "pull_events: call as aggregate:pull_events()")
            assert.has_error(function() User.pending_events(nil) end,
                "pending_events: call as aggregate:pending_events()")
        end)
    end)
end)
