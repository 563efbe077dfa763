-- busted output handler used by `make test` (scripts/test.sh passes -o spec/qx_output.lua):
-- busted's plainTerminal, with each spec file's dots on a line of their own behind its name,
-- and, when QX_TEST_PROGRESS names a file, every test written there as it starts, so that a
-- run that hangs or crashes shows which test it was in, and again with its time when it ends.
return function(options)
    local busted = require 'busted'
    local handler = require 'busted.outputHandlers.plainTerminal'(options)
    local path = os.getenv('QX_TEST_PROGRESS')
    local progress = path and path ~= '' and io.open(path, 'w') or nil
    local first = true

    local function where(element)
        local trace = element.trace or {}
        return tostring(trace.short_src) .. ':' .. tostring(trace.currentline) .. ': '
            .. handler.getFullName(element)
    end

    local clock = os.clock
    local ok, core = pcall(require, 'qx.core')
    if ok then clock = core.clock end -- wall time: most of a test's time is spent waiting
    local started, file_started

    busted.subscribe({ 'file', 'start' }, function(file)
        io.write((first and '' or '\n') .. file.name .. ' ')
        io.flush()
        first = false
        if progress then
            progress:write('file ', file.name, '\n')
            progress:flush()
            file_started = clock()
        end
        return nil, true
    end)

    -- "file took SECONDS name": the whole file, its setup and teardown included
    busted.subscribe({ 'file', 'end' }, function(file)
        if progress and file_started then
            progress:write(('file took %.3f '):format(clock() - file_started), file.name, '\n')
            progress:flush()
        end
        return nil, true
    end)

    busted.subscribe({ 'test', 'start' }, function(element)
        if progress then
            progress:write('test ', where(element), '\n')
            progress:flush()
            started = clock()
        end
        return nil, true
    end)

    -- "took SECONDS file:line: name" after each test: what `make check` leaves out (#slow) is
    -- chosen from these and the files' times
    busted.subscribe({ 'test', 'end' }, function(element)
        if progress and started then
            progress:write(('took %.3f '):format(clock() - started), where(element), '\n')
            progress:flush()
        end
        return nil, true
    end)

    -- "failed file:line: name" and the message's first lines, as soon as a test fails or
    -- errors: a run killed by its time limit prints no summary, and these are then all that
    -- says why its tests failed (scripts/test.sh prints them)
    local function failed(element, _, message)
        if progress and element.descriptor == 'it' then
            local text = type(message) == 'string' and message or tostring(message)
            local lines, n = {}, 0
            for line in (text .. '\n'):gmatch('([^\n]*)\n') do
                n = n + 1
                if n > 12 then break end
                lines[n] = '  ' .. line
            end
            progress:write('failed ', where(element), '\n', table.concat(lines, '\n'), '\n')
            progress:flush()
        end
        return nil, true
    end
    busted.subscribe({ 'failure', 'it' }, failed)
    busted.subscribe({ 'error', 'it' }, failed)

    return handler
end
