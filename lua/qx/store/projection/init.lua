-- qx.projection: read models kept up to date from the event store, exactly once. runner.lua
-- runs one projection (batches, catch_up, run, rebuild, status); versions.lua builds versions
-- beside each other and switches readers between them; rebuild_slots.lua caps rebuilds per
-- database. This file assembles them; docs/projections.md has the contract.
local runner = require "qx.store.projection.runner"
local versions = require "qx.store.projection.versions"

local _M = {
    _VERSION = runner._VERSION,
    new = runner.new,
    Projection = runner.Projection,
    list = versions.list,
    switch = versions.switch,
    drop = versions.drop,
}

versions._methods(runner.Projection, runner._ensure)

return _M
