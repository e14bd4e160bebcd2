-- sluice fleet lease: one GCRA bucket per class, spent in leases.
--
-- KEYS[1]  sluice:<namespace>:{<class>}        hash: tat (us), t_ns, burst
-- KEYS[2]  sluice:<namespace>:{<class>}:hosts  hash: host -> "demand weight seen_us"
-- ARGV     host, t_ns, burst, want, give, charge, seen_tat, demand_milli,
--          weight, quiet_us, interval_us
-- Returns  {granted, tat, active_hosts, mismatch, now}
--
-- Times are integer microseconds from the store's own TIME, so every host
-- shares one clock. tat only moves forward, except a return (which never
-- goes past a full bucket); a host's seen_tat restores it after the store
-- lost its data, so a restart never hands out a fresh burst.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local host = ARGV[1]
local t_ns = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local give = tonumber(ARGV[5])
local charge = tonumber(ARGV[6])
local seen_tat = tonumber(ARGV[7])
local demand = tonumber(ARGV[8])
local weight = tonumber(ARGV[9])
local quiet = tonumber(ARGV[10])
local interval = tonumber(ARGV[11])

-- The store's rate and burst win over ours; a difference is reported.
local mismatch = 0
local cur = redis.call('HMGET', KEYS[1], 'tat', 't_ns', 'burst')
if cur[2] and cur[3] then
  local st, sb = tonumber(cur[2]), tonumber(cur[3])
  if st ~= t_ns or sb ~= burst then
    mismatch = 1
    t_ns, burst = st, sb
  end
end

-- A number as exact integer text (tostring would print 1.7e+15).
local function int(n)
  return string.format('%.0f', n)
end

-- Microseconds of n tokens, rounded up (never mints).
local function span(n)
  return math.ceil(n * t_ns / 1000)
end

local tat = math.max(tonumber(cur[1] or '0'), seen_tat)

-- A return: back by the tokens' time, rounded down, never past full.
if give > 0 then
  tat = math.max(now, tat - math.floor(give * t_ns / 1000))
end

-- Fallback spending charged on reconnection, capped at an empty bucket.
if charge > 0 then
  tat = math.min(math.max(tat, now) + span(charge), now + span(burst))
end

-- This host's demand, and the hosts heard from within the quiet window.
redis.call('HSET', KEYS[2], host, int(demand) .. ' ' .. int(weight) .. ' ' .. int(now))
local all = redis.call('HGETALL', KEYS[2])
local hosts, weights = 0, 0
for i = 1, #all, 2 do
  local d, w, seen = string.match(all[i + 1], '^(%S+) (%S+) (%S+)$')
  if not seen or tonumber(seen) < now - quiet then
    redis.call('HDEL', KEYS[2], all[i])
  else
    hosts = hosts + 1
    if tonumber(d) > 0 then
      weights = weights + tonumber(w)
    end
  end
end

-- Grant: what the bucket holds, within this host's weighted share of it.
local granted = 0
if want > 0 then
  local base = math.max(tat, now)
  local avail = math.floor((now + burst * t_ns / 1000 - base) * 1000 / t_ns)
  -- This host's weighted share of one interval's refill, or of what the
  -- bucket holds when that is more (a full bucket's burst is shared too).
  -- Hosts asking in turn each get their share, whatever their phase.
  local share = avail
  if weights > 0 and demand > 0 then
    local refill = interval * 1000 / t_ns
    local exact = math.max(avail, refill) * weight / weights
    -- Rounded up with probability equal to the fraction (the clock's low
    -- digits stand in for a random number), so no host gains by its phase.
    share = math.floor(exact)
    if (now % 997) / 997 < exact - share then
      share = share + 1
    end
    share = math.max(1, share)
  end
  granted = math.max(0, math.min(want, avail, share))
  if granted > 0 then
    tat = base + span(granted)
  end
end

redis.call('HSET', KEYS[1], 'tat', int(tat), 't_ns', int(t_ns), 'burst', int(burst))
local left_ms = math.ceil(math.max(tat - now, 0) / 1000)
redis.call('PEXPIRE', KEYS[1], left_ms + math.ceil(quiet / 1000))
redis.call('PEXPIRE', KEYS[2], math.ceil(quiet / 1000))
return {granted, tat, hosts, mismatch, now}
