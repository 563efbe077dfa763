-- qx.outbox(db) against a real PostgreSQL, in a database of its own so counts and order are
-- exact: reading pending rows oldest first, marking them published, retryable failures with
-- backoff, dead letters, retention, and bad ids that change nothing.
local qx = require "qx"
local core = require "qx.core"

local support = require "support"

describe("outbox", function()
    local dbs, db, outbox
    local Sent = qx.integration_event("outbox_spec.thing.happened")

    -- n events, one unit of work each so seq follows creation; returns their ids in order
    local function emit(n, tag)
        local ids = {}
        for i = 1, n do
            assert(db:unit_of_work(function(uow)
                ids[i] = uow:record(Sent{ tag = tag, i = i }).event_id
                return true
            end))
        end
        return ids
    end

    local function row(id)
        return assert(db:query([[SELECT published_at, attempts, last_error, dead_at,
        extract(epoch FROM next_attempt_at)::float8 AS next_at
      FROM qx_outbox_events WHERE id = $1]], id))[1]
    end

    local function server_now()
        return assert(db:query("SELECT extract(epoch FROM clock_timestamp())::float8 AS t"))[1].t
    end

    -- record_failure, and the delay it scheduled as the bounds [lo, hi] of what it can be
    -- (the server's clock before and after the call; no assumption on how fast the machine is)
    local function fail_and_delay(id, msg, opts)
        local before = server_now()
        assert.equal(1, assert(outbox:record_failure(id, msg, opts)))
        local after = server_now()
        local r = row(id)
        return r, r.next_at - after, r.next_at - before
    end

    local function snapshot()
        return assert(db:query([[SELECT id::text AS id, published_at::text AS p, attempts, last_error,
        next_attempt_at::text AS n, dead_at::text AS d FROM qx_outbox_events ORDER BY seq]]))
    end

    local function ids_of(rows) return support.field(rows, "id") end

    setup(function()
        dbs = support.fresh_databases("qx_outbox_spec")
        db = support.migrated_db{ url = support.url_for(dbs.create()), pool_size = 2 }
        outbox = qx.outbox(db)
    end)

    teardown(function()
        if db then db:close() end
        if dbs then dbs.drop_all() end
    end)

    before_each(function()
        assert(db:exec("DELETE FROM qx_outbox_events"))
    end)

    it("lists pending rows oldest first, with limit and offset", function()
        local ids = emit(5, "order")
        local rows = assert(outbox:get_unpublished{})
        assert.same(ids, ids_of(rows))
        assert.same({ ids[2], ids[3] }, ids_of(assert(outbox:get_unpublished{ limit = 2, offset = 1 })))
        assert.same({ ids[5] }, ids_of(assert(outbox:get_unpublished{ limit = 10, offset = 4 })))
        assert.same({}, assert(outbox:get_unpublished{ limit = 10, offset = 5 }))
        assert.same({}, assert(outbox:get_unpublished{ limit = 0 }))
        local r = rows[1]
        assert.equal("outbox_spec.thing.happened", r.event_name)
        assert.equal(1, r.event_version)
        assert.equal(ids[1], r.payload.event_id)
        assert.same({ tag = "order", i = 1 }, r.payload.payload)
        assert.equal(0, r.attempts)
        assert.equal(core.null, r.published_at)
    end)

    it("counts pending rows", function()
        assert.equal(0, assert(outbox:count_unpublished()))
        local ids = emit(3, "count")
        assert.equal(3, assert(outbox:count_unpublished()))
        assert.equal(1, assert(outbox:mark_published(ids[1])))
        assert.equal(2, assert(outbox:count_unpublished()))
    end)

    it("marks one id or a list of ids published, once", function()
        local ids = emit(4, "mark")
        assert.equal(1, assert(outbox:mark_published(ids[1])))
        assert.equal(2, assert(outbox:mark_published{ ids[2], ids[3] }))
        assert.equal(0, assert(outbox:mark_published(ids[1]))) -- already published
        assert.equal(0, assert(outbox:mark_published{}))
        assert.equal(0, assert(outbox:mark_published(qx.uuid()))) -- unknown id
        assert.are_not.equal(core.null, row(ids[1]).published_at)
        assert.same({ ids[4] }, ids_of(assert(outbox:get_unpublished{})))
    end)

    it("records a retryable failure: attempts, last error, and an exponential backoff", function()
        local ids = emit(2, "retry")
        local r, lo, hi = fail_and_delay(ids[1], "nats down", { base_delay_ms = 1000 })
        assert.equal(1, r.attempts)
        assert.equal("nats down", r.last_error)
        assert.is_true(lo <= 1.0 and hi >= 1.0, ("delay between %.3f and %.3f"):format(lo, hi))
        assert.equal(core.null, r.dead_at)
        -- not offered again before its time, but still pending
        assert.same({ ids[2] }, ids_of(assert(outbox:get_unpublished{})))
        assert.same(ids, ids_of(assert(outbox:get_unpublished{ include_scheduled = true })))
        assert.equal(2, assert(outbox:count_unpublished()))

        r, lo, hi = fail_and_delay(ids[1], "still down", { base_delay_ms = 1000 })
        assert.equal(2, r.attempts)
        assert.equal("still down", r.last_error)
        assert.is_true(lo <= 2.0 and hi >= 2.0, ("delay between %.3f and %.3f"):format(lo, hi))

        lo, hi = select(2, fail_and_delay(ids[1], "and again", { base_delay_ms = 1000, max_delay_ms = 1500 }))
        assert.is_true(lo <= 1.5 and hi >= 1.5, ("capped delay between %.3f and %.3f"):format(lo, hi))
    end)

    it("keeps at most 2048 characters of the last error", function()
        local ids = emit(1, "long")
        assert(outbox:record_failure(ids[1], string.rep("x", 5000)))
        assert.equal(2048, #row(ids[1]).last_error)
    end)

    it("dead-letters a row once it has failed max_attempts times", function()
        local ids = emit(1, "max")
        assert.equal(1, assert(outbox:record_failure(ids[1], "1", { max_attempts = 2, base_delay_ms = 0 })))
        assert.equal(core.null, row(ids[1]).dead_at)
        assert.equal(1, assert(outbox:record_failure(ids[1], "2", { max_attempts = 2, base_delay_ms = 0 })))
        assert.are_not.equal(core.null, row(ids[1]).dead_at)
        assert.equal(0, assert(outbox:count_unpublished()))
        assert.equal(0, assert(outbox:record_failure(ids[1], "3"))) -- dead rows are left alone
        assert.equal(2, row(ids[1]).attempts)
    end)

    it("dead-letters a row with mark_failed, and retry_dead brings it back", function()
        local ids = emit(3, "dead")
        assert.equal(1, assert(outbox:mark_failed(ids[2], "poison message")))
        local r = row(ids[2])
        assert.are_not.equal(core.null, r.dead_at)
        assert.equal("poison message", r.last_error)
        assert.equal(1, r.attempts)
        assert.same({ ids[1], ids[3] }, ids_of(assert(outbox:get_unpublished{})))
        assert.equal(2, assert(outbox:count_unpublished()))
        assert.same({ ids[2] }, ids_of(assert(outbox:get_dead{})))
        assert.equal(0, assert(outbox:mark_failed(ids[2], "again"))) -- already dead

        assert.equal(1, assert(outbox:retry_dead(ids[2])))
        r = row(ids[2])
        assert.equal(core.null, r.dead_at)
        assert.equal(0, r.attempts)
        assert.same(ids, ids_of(assert(outbox:get_unpublished{})))

        assert(outbox:mark_failed(ids[1], "x"))
        assert(outbox:mark_failed(ids[3], "y"))
        assert.equal(2, assert(outbox:retry_dead()))
        assert.equal(3, assert(outbox:count_unpublished()))
    end)

    it("purges published rows before a time, keeping pending and dead ones", function()
        local ids = emit(4, "purge")
        assert(outbox:mark_published{ ids[1], ids[2] })
        assert(outbox:mark_failed(ids[3], "dead"))
        assert(db:exec("UPDATE qx_outbox_events SET published_at = now() - interval '2 days' WHERE id = $1", ids[1]))
        local cutoff = assert(db:query("SELECT to_char((now() - interval '1 day') AT TIME ZONE 'UTC',"
            .. " 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') AS t"))[1].t
        assert.equal(1, assert(outbox:purge{ published_before = cutoff }))
        local left = ids_of(snapshot())
        assert.same({ ids[2], ids[3], ids[4] }, left)
        assert.equal(0, assert(outbox:purge{ older_than_seconds = 3600 }))
        assert.equal(1, assert(outbox:purge{ older_than_seconds = 0 }))
        assert.same({ ids[3], ids[4] }, ids_of(snapshot()))
    end)

    it("reports its status", function()
        local ids = emit(4, "status")
        assert(outbox:mark_published(ids[1]))
        assert(outbox:mark_failed(ids[2], "dead"))
        assert(outbox:record_failure(ids[3], "later", { base_delay_ms = 60000 }))
        local s = assert(outbox:status())
        assert.equal(2, s.pending)
        assert.equal(1, s.scheduled)
        assert.equal(1, s.dead)
        assert.equal(1, s.published)
        assert.equal(1, s.max_attempts)
        assert.is_true(s.oldest_pending_age_seconds >= 0)
    end)

    describe("bad input", function()
        local function unchanged(before)
            assert.same(before, snapshot())
        end

        it("refuses ids that are not uuids and changes nothing", function()
            local ids = emit(2, "bad")
            local before = snapshot()
            for _, call in ipairs({
            function() return outbox:mark_published("not-a-uuid") end,
            function() return outbox:mark_published{ ids[1], "not-a-uuid" } end,
            function() return outbox:mark_published{ ids[1], 42 } end,
            function() return outbox:mark_published(42) end,
            function() return outbox:mark_published("{" .. ids[1] .. "}") end,
            function() return outbox:record_failure("x", "m") end,
            function() return outbox:record_failure(nil, "m") end,
            function() return outbox:mark_failed(123, "m") end,
            function() return outbox:retry_dead{ ids[1], "nope" } end,
            function() return outbox:retry_dead(ids[1] .. "," .. ids[2]) end,
            }) do
            local n, e = call()
            assert.is_nil(n)
            assert.equal("invalid", e.code)
            unchanged(before)
            end
        end)

        it("returns a db error for a timestamp PostgreSQL cannot read, deleting nothing", function()
            local ids = emit(1, "bad-ts")
            assert(outbox:mark_published(ids[1]))
            local before = snapshot()
            local n, e = outbox:purge{ published_before = "next tuesday-ish" }
            assert.is_nil(n)
            assert.equal("invalid", e.code)
            unchanged(before)
        end)

        it("raises on limits, offsets and purge options that make no sense (misuse)", function()
            assert.has_error(function() outbox:get_unpublished{ limit = -1 } end)
            assert.has_error(function() outbox:get_unpublished{ limit = 1.5 } end)
            assert.has_error(function() outbox:get_unpublished{ limit = 10001 } end)
            assert.has_error(function() outbox:get_unpublished{ offset = "1" } end)
            assert.has_error(function() outbox:purge() end)
            assert.has_error(function() outbox:purge{} end)
            assert.has_error(function() outbox:purge{ published_before = 12 } end)
            assert.has_error(function() outbox:purge{ older_than_seconds = -1 } end)
            assert.has_error(function() outbox:record_failure(qx.uuid(), "m", { base_delay_ms = -5 }) end)
            assert.has_error(function() qx.outbox({}) end)
        end)
    end)
end)
