-- The shop's handlers (shop.handlers) for nginx worker threads (qx.openresty.run): nginx
-- requires this module once in each thread VM, and the first call in a VM takes a hold on the
-- worker's shared connection pool, which every later call reuses.
--
-- Every thread VM of an nginx worker shares one pool: a worker holds at most as many
-- connections as calls run at once (QX_DB__POOL_SIZE caps it, default 10), however many VMs
-- nginx makes.
local openresty = require "qx.openresty"

return openresty.handlers(require "shop.handlers", { db = { shared_pool = "shop" } })
