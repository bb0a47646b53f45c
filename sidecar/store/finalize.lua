-- End a run that its producer can no longer end: append the synthesized terminal and the final
-- meta, atomically, exactly once however many readers and replicas race to do it.
--
-- KEYS[1] = stream key, KEYS[2] = meta key
-- ARGV    = finalizer id, expected last_seq, require_dead ("1": only if the producer's lease has
--           expired), ttl_ms, wake ("1": SPUBLISH the new last seq on <stream key>:tail, as
--           append.lua does, so that the live tail's followers get the terminal), nmeta, nmeta
--           pairs of (field, value), then quads of (seq, data, timestamp_ms, complete)
--
-- Returns {1, last_seq} when it ended the run, {0, status} when the run had already ended,
-- {-1} when the producer's lease is still live, {-2, last_seq} when events arrived since the
-- caller read the meta (read again and retry), {-4} when there is no such run.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cur = redis.call('HMGET', KEYS[2], 'status', 'lease_until_ms', 'last_seq')
if not cur[1] then
  return {-4}
end
if cur[1] ~= 'running' then
  return {0, cur[1]}
end
if ARGV[3] == '1' and tonumber(cur[2] or '0') > now then
  return {-1}
end
local last = tonumber(cur[3] or '0')
if last ~= tonumber(ARGV[2]) then
  return {-2, last}
end
local nmeta = tonumber(ARGV[6])
local first = 7 + 2 * nmeta
for i = first, #ARGV, 4 do
  redis.call('XADD', KEYS[1], ARGV[i] .. '-0', 'seq_id', ARGV[i], 'data', ARGV[i + 1],
    'timestamp', ARGV[i + 2], 'complete', ARGV[i + 3])
  last = tonumber(ARGV[i])
end
-- The finalizer becomes the producer: a producer that comes back is fenced, not interleaved.
local fields = {'producer', ARGV[1], 'last_seq', last, 'updated_ms', now, 'lease_until_ms', 0}
for i = 7, first - 1, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
redis.call('HSET', KEYS[2], unpack(fields))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
if ARGV[5] == '1' then
  redis.call('SPUBLISH', KEYS[1] .. ':tail', last)
end
return {1, last}
