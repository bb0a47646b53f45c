-- Append a batch of one run's events and update its meta, atomically and idempotently.
--
-- KEYS[1] = stream key, KEYS[2] = meta key (same hash slot: the run id is their hash tag)
-- ARGV    = producer, claim ("0": none; "1": may replace a finished run; "2": only a run id
--           nothing is stored under), lease_ms, ttl_ms, maxlen, known_last (the last seq the
--           producer saw confirmed), allow_gap ("1": seqs the writer could not store precede
--           this batch; record them as lost instead of refusing), wake ("1": the live tail is
--           woken by sharded pub/sub, see below), nmeta,
--           nmeta pairs of (field, value), then quads of (seq, data, timestamp_ms, complete)
--
-- Returns {0, added, trimmed, last_seq, rebuilt, replaced, rolled_back} on success (rebuilt = 1
-- when the meta had vanished under this producer and was rebuilt; replaced = 1 when this claim
-- replaced a stored run; rolled_back = how many events Redis had confirmed to this producer and
-- no longer holds), {-1, holder} when another producer holds a live lease (claim refused), {-2,
-- holder} when another producer took the run over (fenced), {-3, last_seq} when a batch would
-- leave a gap in the seqs that allow_gap does not allow, {-4, status} when a "2" claim finds the
-- run id stored.
--
-- Idempotence: an event whose seq is not above the stored last_seq was already written by an
-- earlier attempt whose reply was lost, so it is skipped; stream ids are "<seq>-0".
--
-- Wake-up: with wake = "1", a batch that added entries ends with SPUBLISH <stream key>:tail
-- <last seq>, for the followers of the run (sidecar/store/cluster_tail.py). The channel has the
-- run's hash tag, so the script stays in its slot. With "0" nothing is published (a follower
-- blocked in XREAD is woken by the XADD itself; Redis before 7.0 has no SPUBLISH).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local producer = ARGV[1]
local nmeta = tonumber(ARGV[9])
local first = 10 + 2 * nmeta
local cur = redis.call('HMGET', KEYS[2], 'producer', 'status', 'lease_until_ms', 'last_seq')
local last = tonumber(cur[4] or '0')
local rebuilt = 0
local replaced = 0
if cur[1] ~= producer then
  if ARGV[2] ~= '0' then
    if cur[1] and cur[2] == 'running' and tonumber(cur[3] or '0') > now then
      return {-1, cur[1]}
    end
    -- A finished run, or one whose producer's lease expired: this run id starts anew (a new
    -- generation), unless the claim may only take a run id that nothing is stored under.
    if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then
      if ARGV[2] == '2' then
        return {-4, cur[2] or ''}
      end
      redis.call('DEL', KEYS[1], KEYS[2])
      replaced = 1
    end
    last = 0
  elseif cur[1] then
    return {-2, cur[1]}
  else
    -- The meta vanished under a running producer (Redis restarted empty, or the TTL passed):
    -- rebuild it from what the producer knows, and say that the history before is gone.
    last = tonumber(ARGV[6])
    rebuilt = 1
  end
end
-- Redis holds fewer of this producer's events than it confirmed (it failed over to a replica
-- that had not received them, or restarted from older data): they are lost; say which, and
-- store on after them.
local rolled_back = 0
local known = tonumber(ARGV[6])
if rebuilt == 0 and cur[1] == producer and known > last then
  rolled_back = known - last
  local before = redis.call('HGET', KEYS[2], 'history_lost_ranges')
  local range = (last + 1) .. '-' .. known
  redis.call('HSET', KEYS[2], 'incomplete', 'history_lost',
    'history_lost_ranges', before and (before .. ',' .. range) or range)
  last = known
end
-- Check the whole batch before writing any of it: a refused batch leaves nothing behind.
local expect = last
local ranges = {}
local lost = 0
for i = first, #ARGV, 4 do
  local seq = tonumber(ARGV[i])
  if seq > expect then
    if seq ~= expect + 1 then
      if ARGV[7] ~= '1' then
        return {-3, last}
      end
      ranges[#ranges + 1] = (expect + 1) .. '-' .. (seq - 1)
      lost = lost + seq - 1 - expect
    end
    expect = seq
  end
end
local added = 0
for i = first, #ARGV, 4 do
  local seq = tonumber(ARGV[i])
  if seq > last then
    redis.call('XADD', KEYS[1], seq .. '-0', 'seq_id', ARGV[i], 'data', ARGV[i + 1],
      'timestamp', ARGV[i + 2], 'complete', ARGV[i + 3])
    last = seq
    added = added + 1
  end
end
local fields = {'producer', producer, 'last_seq', last, 'updated_ms', now,
  'lease_until_ms', now + tonumber(ARGV[3])}
if rebuilt == 1 then
  fields[#fields + 1] = 'status'
  fields[#fields + 1] = 'running'
  if tonumber(ARGV[6]) > 0 then
    fields[#fields + 1] = 'incomplete'
    fields[#fields + 1] = 'history_lost'
    fields[#fields + 1] = 'history_lost_through'
    fields[#fields + 1] = ARGV[6]
  end
end
if #ranges > 0 then
  local before = redis.call('HGET', KEYS[2], 'lost_ranges')
  local joined = table.concat(ranges, ',')
  fields[#fields + 1] = 'lost_ranges'
  fields[#fields + 1] = before and (before .. ',' .. joined) or joined
  redis.call('HINCRBY', KEYS[2], 'lost_events', lost)
end
for i = 10, first - 1, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
end
redis.call('HSET', KEYS[2], unpack(fields))
local trimmed = 0
if added > 0 then
  local maxlen = tonumber(ARGV[5])
  if redis.call('XLEN', KEYS[1]) > maxlen then
    trimmed = redis.call('XTRIM', KEYS[1], 'MAXLEN', maxlen)
    redis.call('HINCRBY', KEYS[2], 'trimmed_events', trimmed)
  end
end
local ttl = tonumber(ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
if added > 0 and ARGV[8] == '1' then
  redis.call('SPUBLISH', KEYS[1] .. ':tail', last)
end
return {0, added, trimmed, last, rebuilt, replaced, rolled_back}
