-- busted output handler used by `make test` (scripts/test.sh passes -o spec/qx_output.lua):
-- busted's plainTerminal, with each spec file's dots on a line of their own behind its name,
-- and, when QX_TEST_PROGRESS names a file, every test written there as it starts, so that a
-- run that hangs or crashes shows which test it was in.
return function(options)
    local busted = require 'busted'
    local handler = require 'busted.outputHandlers.plainTerminal'(options)
    local path = os.getenv('QX_TEST_PROGRESS')
    local progress = path and path ~= '' and io.open(path, 'w') or nil
    local first = true

    busted.subscribe({ 'file', 'start' }, function(file)
        io.write((first and '' or '\n') .. file.name .. ' ')
        io.flush()
        first = false
        if progress then
            progress:write('file ', file.name, '\n')
            progress:flush()
        end
        return nil, true
    end)

    busted.subscribe({ 'test', 'start' }, function(element)
        if progress then
            local trace = element.trace or {}
            progress:write('test ', tostring(trace.short_src), ':', tostring(trace.currentline), ': ',
                handler.getFullName(element), '\n')
            progress:flush()
        end
        return nil, true
    end)

    return handler
end
