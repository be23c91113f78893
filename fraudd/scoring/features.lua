#!lua name=fraudd_v6
--[[
Commit of one batch's behaviour state (FCALL fraudd_commit_v6): per user, compare-and-set of its
state together with its transactions' dedup markers, all in one atomic call.

Why so little here: the arithmetic runs in the workers (behaviour.py), because Redis is the
single-threaded process they all share. Redis only checks that nobody wrote the state since it was
read and that no transaction was counted before, and stores the new states and markers, so a
transaction is counted once however many workers race on a user. Every µs spent here per
transaction caps the whole pipeline, and a command called from Lua costs several times what the
same work costs in one command: markers live in one hash per minute of event time (dedup.py),
checked with one HMGET and added with one HSET per bucket, and states in one hash per 25-hour
period of wall-clock time (features.py), read with one HMGET and written with one HSET per batch.

State periods: KEYS[1..3] are always the periods before, of and after the caller's clock. A state
in a later period is newer, and a batch writes its states into the latest period that holds any
of them, or the caller's own if later: a worker whose clock runs behind another's never writes a
state where the newer copy would hide it.

KEYS: [1..3] state periods, then the b marker buckets, then the five blocklist sets (merchant,
      device, ip, country, card: BLOCKLIST_KINDS in features.py, in its order). Every key carries
      the shard's {hash tag}, so the call is in one slot.
ARGV: [1] dedup_window_ms, [2] state_ttl_ms, [3] u, [4] b, then fixed-width strings (few large
      arguments cost both sides far less than one argument per field):
      [5] stamps  per user, the first 12 bytes of its state as read (all zero = absent)
      [6] counts  per bucket, its marker count, 4 bytes big-endian
      [7] owners  per marker (buckets in order), the number of its user, 4 bytes big-endian
      [8..12] per blocklist the batch's distinct values, NUL-joined ('' = don't look)
      [13..12+2u] per user, its name and its new state
      then per marker, buckets in order: transaction id, event-time offset in its bucket (ms)
Reply: { stale, seen, then per blocklist a string of '0'/'1' flags in the order of its values }.
      stale: the numbers of the users whose state changed since it was read. seen: flat pairs
      (marker number, 1-based; the stored offset) of the markers that already existed. Users in
      neither list were written with all their markers; the others were left unchanged.

Why a 12-byte stamp is enough for the compare-and-set: a state starts with its newest event time
(f8) and the count of transactions applied to it (u4). Every commit that writes a state adds at
least one new transaction, so the count strictly grows with every write and no write can leave
the stamp unchanged; an absent state (all-zero stamp) is never equal to a written one, whose
count is at least 1. The only way back to an earlier stamp is the state expiring (idle for a
whole period) and being rebuilt with exactly as many transactions and the same newest event
time while a reader sat between its read and its commit for all that time.
]]

local function split(s)
    local t = {}
    for v in string.gmatch(s, '[^%z]+') do t[#t + 1] = v end
    return t
end

local BLOCKLISTS = 5  -- merchant, device, ip, country, card (BLOCKLIST_KINDS in features.py)

-- Read here rather than in the worker's read so an empty list (the usual case) costs one SCARD,
-- and operators' edits apply from the next batch on. A list found empty is not sent values again
-- (ShardCalls.held_back in features.py) until an EXISTS in the worker's read finds it filled.
local function blocklist_flags(key, joined)
    if joined == '' or redis.call('SCARD', key) == 0 then return '' end
    local values = split(joined)
    local hits = redis.call('SMISMEMBER', key, unpack(values))
    local flags = {}
    for k = 1, #hits do flags[k] = hits[k] == 1 and '1' or '0' end
    return table.concat(flags)
end

-- reply, with the flags of every blocklist appended: its sets at keys[first_key..], the values
-- looked up at args[first_arg..].
local function with_blocklist_flags(reply, keys, first_key, args, first_arg)
    for k = 0, BLOCKLISTS - 1 do
        reply[#reply + 1] = blocklist_flags(keys[first_key + k], args[first_arg + k])
    end
    return reply
end

local ABSENT = '\0\0\0\0\0\0\0\0\0\0\0\0'
local PERIODS = 3  -- KEYS[1..3]: the state periods
local CHUNK = 4000  -- unpack has a stack limit

local function u32(s, k)
    local b1, b2, b3, b4 = string.byte(s, 4 * k - 3, 4 * k)
    return ((b1 * 256 + b2) * 256 + b3) * 256 + b4
end

-- The newest stored state of users 1..n (their names at args[first + step * u]), false when
-- absent, and the latest period (1..PERIODS, 0 = none) that holds any of them.
local function newest(keys, args, first, step, n)
    local states, left, latest = {}, {}, 0
    for u = 1, n do
        states[u] = false
        left[u] = u
    end
    for p = PERIODS, 1, -1 do
        if #left == 0 then break end
        if redis.call('EXISTS', keys[p]) == 1 then
            local still = {}
            for c = 1, #left, CHUNK do
                local fields = {}
                for j = c, math.min(c + CHUNK - 1, #left) do fields[#fields + 1] = args[first + step * left[j]] end
                local got = redis.call('HMGET', keys[p], unpack(fields))
                for j = 1, #got do
                    local u = left[c + j - 1]
                    if got[j] then
                        states[u] = got[j]
                        if latest == 0 then latest = p end
                    else
                        still[#still + 1] = u
                    end
                end
            end
            left = still
        end
    end
    return states, latest
end

-- HSET of args[from..to] (field, value pairs) into key, in chunks.
local function hset_range(key, args, from, to)
    for c = from, to, CHUNK do
        redis.call('HSET', key, unpack(args, c, math.min(c + CHUNK - 1, to)))
    end
end

-- A marker bucket is kept a hash table, never a listpack. Redis stores a hash of up to
-- hash-max-listpack-entries (512) short fields as a listpack, in which every field an HSET adds or
-- an HMGET looks up is found by scanning the bucket: below ≈ 8 transactions per second of event
-- time per shard a whole minute's bucket is one, and at 10 tx/s on one shard those scans were half
-- of Redis's instructions. A value longer than hash-max-listpack-value (64) converts the hash: the
-- field '' (never a transaction id, which has 1-64 characters) carries one into the bucket ahead of
-- the markers, and leaves it in the same call, so a bucket still holds its markers alone. Already
-- a hash table (as soon as it held 512 markers, or from an earlier batch), the bucket costs two
-- O(1) calls more per batch. HSET of args[from..to] (transaction id, offset pairs) into the marker
-- bucket key.
local function add_markers(key, args, from, to)
    -- (the library's load can't reach `string`: the value is made here)
    redis.call('HSET', key, '', string.rep('-', 1024))
    hset_range(key, args, from, to)
    redis.call('HDEL', key, '')
end

local function commit(keys, args)
    local window_ms, ttl_ms, n_users, n_buckets = args[1], args[2], tonumber(args[3]), tonumber(args[4])
    local stamps, counts, owners = args[5], args[6], args[7]
    local sub, call = string.sub, redis.call
    local PAIRS = 7 + BLOCKLISTS  -- ARGV index before the first user's (name, state) pair
    local skip = {}  -- users not to write: stale state or a transaction counted before
    local stale, seen = {}, {}
    local current, latest = newest(keys, args, PAIRS - 1, 2, n_users)
    for u = 1, n_users do
        local state = current[u]
        if (state and sub(state, 1, 12) or ABSENT) ~= sub(stamps, 12 * u - 11, 12 * u) then
            skip[u] = true
            stale[#stale + 1] = u
        end
    end
    -- Check every bucket before writing any: a user is written with all its markers or not at all.
    local first_arg = PAIRS + 2 * n_users  -- ARGV index before the first marker's pair
    local pair, marker = first_arg, 0
    for b = 1, n_buckets do
        local m = u32(counts, b)
        for c = 0, m - 1, CHUNK do
            local fields = {}
            for k = 1, math.min(CHUNK, m - c) do fields[k] = args[pair + 2 * (c + k) - 1] end
            local got = call('HMGET', keys[PERIODS + b], unpack(fields))
            for k = 1, #got do
                if got[k] then
                    local number = marker + c + k
                    seen[#seen + 1] = number
                    seen[#seen + 1] = got[k]
                    skip[u32(owners, number)] = true
                end
            end
        end
        pair, marker = pair + 2 * m, marker + m
    end
    local clean = next(skip) == nil
    local period = keys[math.max(2, latest)]
    if clean then
        hset_range(period, args, PAIRS + 1, PAIRS + 2 * n_users)
    else
        local pairs = {}
        for u = 1, n_users do
            if not skip[u] then
                pairs[#pairs + 1] = args[PAIRS + 2 * u - 1]
                pairs[#pairs + 1] = args[PAIRS + 2 * u]
            end
        end
        if #pairs > 0 then hset_range(period, pairs, 1, #pairs) end
    end
    if n_users > 0 then call('PEXPIRE', period, ttl_ms) end
    pair, marker = first_arg, 0
    for b = 1, n_buckets do
        local m = u32(counts, b)
        local key = keys[PERIODS + b]
        if clean then
            add_markers(key, args, pair + 1, pair + 2 * m)
        else
            local pairs = {}
            for k = 1, m do
                if not skip[u32(owners, marker + k)] then
                    pairs[#pairs + 1] = args[pair + 2 * k - 1]
                    pairs[#pairs + 1] = args[pair + 2 * k]
                end
            end
            if #pairs > 0 then add_markers(key, pairs, 1, #pairs) end
        end
        call('PEXPIRE', key, window_ms)
        pair, marker = pair + 2 * m, marker + m
    end
    return with_blocklist_flags({ stale, seen }, keys, PERIODS + n_buckets + 1, args, 8)
end

--[[
Owned shards (--shards > 1): one worker at a time owns a shard through a lease, so no other writer
races on its users. The worker keeps their states in memory and reads from Redis only the states
it does not hold, which of the batch's transactions were counted before, and the blocklists
(fraudd_owned_read_v6, read-only); it then writes states and markers once, in a MULTI/EXEC of plain
commands under WATCH of the lease (features.py), not here: the same HSETs cost Redis about twice as
much called from Lua, with every state passed through as an argument. For the same reason today's
workers read the states and markers with plain HMGETs and call this with u = b = 0, for the
blocklists alone; it still reads users and markers for a worker of the release before.
]]

-- KEYS: [1..3] state periods, then b marker buckets, then the five blocklists.
-- ARGV: [1] u, [2] b, [3] counts per bucket (4 bytes big-endian), [4..8] blocklist values
--       (NUL-joined), [9..8+u] user names, then the candidate transaction ids, buckets in order.
-- Reply: { latest period holding any of the states (0 = none), states (nil = absent), seen (flat:
--          marker number, stored offset), five flag strings }.
local function owned_read(keys, args)
    local n_users, n_buckets, counts = tonumber(args[1]), tonumber(args[2]), args[3]
    local NAMES = 3 + BLOCKLISTS  -- ARGV index before the first user's name
    local states, latest = newest(keys, args, NAMES, 1, n_users)
    local seen = {}
    local first, marker = NAMES + n_users, 0
    for b = 1, n_buckets do
        local m = u32(counts, b)
        for c = 0, m - 1, CHUNK do
            local last = math.min(c + CHUNK, m)
            local got = redis.call('HMGET', keys[PERIODS + b], unpack(args, first + c + 1, first + last))
            for k = 1, #got do
                if got[k] then
                    seen[#seen + 1] = marker + c + k
                    seen[#seen + 1] = got[k]
                end
            end
        end
        first, marker = first + m, marker + m
    end
    return with_blocklist_flags({ latest, states, seen }, keys, PERIODS + n_buckets + 1, args, 4)
end

-- Shard leases. KEYS: [1] the lease, [2] the shard's epoch counter.
-- ARGV: [1] 'acquire' | 'renew' | 'release', [2] owner (acquire) or token, [3] lease_ms.
-- acquire: the new token '<epoch>:<owner>' when the shard was free, else nil. renew / release:
-- 1 when the caller still held the lease, else 0.
local function lease(keys, args)
    local op, who, lease_ms = args[1], args[2], args[3]
    if op == 'acquire' then
        if redis.call('EXISTS', keys[1]) == 1 then return false end
        local token = redis.call('INCR', keys[2]) .. ':' .. who
        redis.call('SET', keys[1], token, 'PX', lease_ms)
        return token
    end
    if redis.call('GET', keys[1]) ~= who then return 0 end
    if op == 'renew' then redis.call('PEXPIRE', keys[1], lease_ms) else redis.call('DEL', keys[1]) end
    return 1
end

redis.register_function('fraudd_commit_v6', commit)
redis.register_function{function_name = 'fraudd_owned_read_v6', callback = owned_read, flags = {'no-writes'}}
redis.register_function('fraudd_lease_v6', lease)
