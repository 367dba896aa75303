-- slipstream's Yield: a handler that produces zero or more outputs per input,
-- sent into sinks (here print).
--
--   @handle(numbers(), sink=[print])
--   def handler(n):
--       if n == 0: yield f'zero: {n}'
--       if n % 2 == 0: yield f'even: {n}'
--
-- In osara a handler gets `emit` as its second argument and calls it once
-- per output; `kafka:handle(topic, { sink = ... })` sends emitted values to
-- Kafka topics. A source that is a plain generator (numbers() here) is a
-- loop: it calls the same handler with print as its emit.
local osara = require "osara"

local function handler(n, emit)
  if n == 0 then emit(("zero: %d"):format(n)) end
  if n % 2 == 0 then emit(("even: %d"):format(n)) end
end

osara.spawn(function()
  for n = 0, 4 do handler(n, print) end
end)
