--- qx.projection: read models kept up to date from the event store, exactly once; one version
-- runs (runner.lua), versions build beside each other and switch (versions.lua). This file
-- assembles them; docs/projections.md has the contract.
local runner = require "qx.store.projection.runner"

return runner
