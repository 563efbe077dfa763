-- bank.schema: the service's own tables, created once; each statement is idempotent.
-- qx.migrate(db) creates qx's tables (outbox, event store, inbox, checkpoints).
local qx = require "qx"

local STATEMENTS = {
    -- customers: written and read through a repository (id, audit columns, version)
    "CREATE TABLE IF NOT EXISTS bank_customers (" .. qx.schema.id_column() .. ",\n"
        .. "  name text NOT NULL,\n  email text NOT NULL,\n  "
        .. qx.schema.audit_columns{ tenanted = false, soft_delete = false } .. ")",
    -- balances: the projection's read model
    [[CREATE TABLE IF NOT EXISTS bank_account_balances (
        account_id  uuid PRIMARY KEY,
        customer_id uuid NOT NULL,
        balance     bigint NOT NULL DEFAULT 0)]],
    -- notifications: what the consumer writes, once per event
    [[CREATE TABLE IF NOT EXISTS bank_notifications (
        event_id   uuid PRIMARY KEY,
        account_id uuid NOT NULL,
        text       text NOT NULL)]],
}

return {
    apply = function(db)
        assert(qx.migrate(db))
        for _, sql in ipairs(STATEMENTS) do assert(db:exec(sql)) end
        return true
    end,
}
