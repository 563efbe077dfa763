-- core.sha256 (checksums of migration files) and core.dir_list (the files of a migrations folder).
local core = require "qx.core"
local support = require "support"

local function hex(s)
    return (s:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

describe("core.sha256", function()
    it("gives the FIPS 180-2 digests", function()
        assert.equal("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", hex(core.sha256("")))
        assert.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", hex(core.sha256("abc")))
        assert.equal(32, #core.sha256(("x"):rep(100000)))
    end)
end)

describe("core.dir_list", function()
    it("lists the regular files of a folder, not its subfolders or dot files", function()
        local dir = os.tmpname()
        os.remove(dir)
        assert(os.execute("mkdir -p " .. support.sh(dir .. "/sub")))
        for _, name in ipairs({ "b.sql", "a.sql", ".gitkeep" }) do
            local f = assert(io.open(dir .. "/" .. name, "w"))
            f:close()
        end
        local names = assert(core.dir_list(dir))
        table.sort(names)
        assert.same({ "a.sql", "b.sql" }, names)
        os.execute("rm -rf " .. support.sh(dir))
        local none, e = core.dir_list(dir)
        assert.is_nil(none)
        assert.equal("not_found", e.code)
    end)
end)
