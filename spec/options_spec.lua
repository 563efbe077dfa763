-- Strict options: every function of qx that takes an option table refuses a name it does not
-- know, raising at the caller's line and listing the names it knows (a misspelt option would
-- otherwise be dropped without a word: the context of a unit of work, a timeout, a dry run).
local qx = require "qx"
local support = require "support"

local HERE = "options_spec%.lua:%d+: "

-- the message raised by fn, which must raise
local function raised(fn)
    local ok, e = pcall(fn)
    assert.is_false(ok, "expected an error")
    return tostring(e)
end

describe("strict options", function()
    local db

    setup(function() db = support.migrated_db{ pool_size = 2 } end)
    teardown(function() if db then db:close() end end)

    it("db:unit_of_work raises at the caller on a misspelt context and lists the known options", function()
        local ran = false
        local e = raised(function()
            db:unit_of_work(function() ran = true end, { contxt = { tenant_id = "t1" } })
        end)
        assert.matches(HERE .. "unit_of_work: unknown option 'contxt' %(known: [^)]*context", e)
        assert.is_false(ran)
    end)

    it("db:unit_of_work raises on statement_timeout, which is statement_timeout_ms", function()
        local e = raised(function()
            db:unit_of_work(function() end, { statement_timeout = 5 })
        end)
        assert.matches(HERE .. "unit_of_work: unknown option 'statement_timeout' %(known: [^)]*statement_timeout_ms", e)
    end)

    it("qx.migrate raises on an option it does not have (dry_run)", function()
        local e = raised(function() qx.migrate(db, { dry_run = true }) end)
        assert.matches(HERE .. "qx.migrate: unknown option 'dry_run' %(known: dir, steps%)", e)
    end)

    it("qx.event and qx.integration_event refuse 'integration' at the caller: the function says which", function()
        -- qx.event(name, { integration = true }) made a domain event: nothing went to the outbox
        assert.matches(HERE .. "qx.event: 'integration' is not an option here.*qx.integration_event",
                       raised(function() qx.event(support.unique("spec.notice"), { integration = true }) end))
        assert.matches(HERE .. "qx.integration_event: 'integration' is not an option here",
                       raised(function()
                           qx.integration_event(support.unique("spec.notice"), { integration = false })
                       end))
        assert.is_false(qx.event(support.unique("spec.notice"), { version = 2 }).integration)
        assert.is_true(qx.integration_event(support.unique("spec.notice"), { version = 2 }).integration)
    end)

    it("qx.connect lists the known options", function()
        local e = raised(function() qx.connect{ urll = support.db_url() } end)
        assert.matches(HERE .. "qx.connect: unknown option 'urll' %(known: [^)]*url", e)
    end)

    it("qx.relay lists the known options", function()
        local e = raised(function() qx.relay{ db = db, shard = 1 } end)
        assert.matches(HERE .. "qx.relay: unknown option 'shard' %(known: [^)]*shard_id", e)
    end)

    it("qx.nats.connect raises at the caller, not inside qx", function()
        local e = raised(function() qx.nats.connect{ server = "nats://127.0.0.1:1" } end)
        assert.matches(HERE .. "qx.nats: unknown option 'server' %(known: [^)]*servers", e)
    end)

    it("the outbox's methods refuse unknown options", function()
        local ob = qx.outbox(db)
        assert.matches(HERE .. "get_dead: unknown option 'limt'", raised(function() ob:get_dead{ limt = 1 } end))
        assert.matches(HERE .. "get_unpublished: unknown option 'ofset'",
                       raised(function() ob:get_unpublished{ ofset = 1 } end))
        assert.matches(HERE .. "purge: unknown option 'older_than'",
                       raised(function() ob:purge{ older_than = 1 } end))
    end)

    it("the projection, the consumer and the publisher refuse unknown options at the caller", function()
        assert.matches(HERE .. "qx.projection: unknown option 'nme'",
                       raised(function() qx.projection{ nme = "x" } end))
        assert.matches(HERE .. "qx.consumer: unknown option 'strem'",
                       raised(function() qx.consumer{ strem = "x" } end))
        assert.matches(HERE .. "qx.publisher: unknown option 'nat'",
                       raised(function() qx.publisher{ nat = {} } end))
    end)

    it("store:each and projection:run refuse unknown options at the caller", function()
        local es = qx.event_store{ db = db }
        assert.matches(HERE .. "store:each: unknown option 'limit' %(known: after, batch,",
                       raised(function() es:each{ limit = 5 } end))
        local p = qx.projection{ name = support.unique("opt_proj"), db = db,
                                handlers = { ["spec.opt.x"] = function() end } }
        assert.matches(HERE .. "projection:run: unknown option 'poll' %(known: poll_ms, stop, max_seconds, "
                       .. "metrics_listen, health_stale_ms, handle_signals%)",
                       raised(function() p:run{ poll = 5 } end))
    end)

    it("es:load, es:append and the repository's methods raise at the caller inside a unit of work", function()
        local es = qx.event_store{ db = db }
        local repo = qx.repository{ table = "qx_outbox_events" }
        local errs = {}
        assert(db:unit_of_work(function(uow)
            local b = uow:store(es)
            local Opt = qx.event_sourced(support.unique("Opt"))
            errs[1] = raised(function() b:load(Opt, qx.uuid(), { snapshots = true }) end)
            errs[2] = raised(function() b:append("x") end)
            errs[3] = raised(function() repo:bind(uow):add({ id = qx.uuid() }, { returning = true }) end)
        end))
        assert.matches(HERE .. "es:load: unknown option 'snapshots' %(known: snapshot, archived%)", errs[1])
        assert.matches(HERE .. "es:append", errs[2])
        assert.matches(HERE .. "add: unknown option 'returning'", errs[3])
    end)
end)
