#!lua name=fraudd
--[[
Behaviour features for one batch in one atomic call (FCALL fraudd_features).

Why a Function and not client round trips: Redis is the one single-threaded stage every worker
shares, so the whole batch is one call that reads each user's and card's state once, updates it
in place and writes it back once; per transaction there is exactly one redis.call (the dedup
marker). Why packed strings: a fixed-size struct per user keeps memory bounded and costs one key
per active user, where a sorted set per user costs an entry per transaction and 5x the CPU.

KEYS: [1..n]       dedup markers, in batch order (SET NX GET PX: first writer wins)
      [n+1..n+u]   user state keys
      [..+c]       card state keys
      [last 4]     blocklist sets: merchant, device, ip, country
ARGV: n, n_users, n_cards, dedup_window_ms, state_ttl_ms, records, then one NUL-joined string of
      the batch's distinct values per blocklist kind (same order as the blocklist keys).
records: n fixed-size little-endian records, sorted by (user, event time, batch position):
      pos H (1-based batch position), user H (1-based user number), card H (0 = none),
      ts_ms d, amount d, merchant hash I, country code H (0 = none), device hash I (0 = none)
Reply: { features blob (one OUT_FMT record per input record, same order), then per blocklist kind
      a string of '0'/'1' flags in the order of that kind's distinct values ('' = empty list) }
]]

-- Time buckets. The 1 h window is the current 10-minute slot and the 5 before it, the 24 h
-- window the current 2-hour slot and the 11 before it: one byte per slot keeps the rings cheap.
local S1H, N1H = 600000, 6
local S24, N24 = 7200000, 12
local MINUTE_MS = 60000
-- Recent transactions kept exactly (1-minute count, seconds since previous, and to take later
-- transactions back out of a bucket when features are computed at an earlier event time).
local KR, KRC = 6, 4
-- Entities kept per user (least recently seen is evicted): merchants, countries, devices.
local KM, KC, KD = 4, 3, 3
local EMPTY = 4294967295

local USER_FMT, CARD_FMT, REC_FMT, OUT_FMT
local floor

-- The library's load environment has no `string` or `math`: bind them on first use.
local function init()
    floor = math.floor
    local r = string.rep
    USER_FMT = '<dId' .. r('If', KR) .. 'c6c12' .. r('f', N24) .. r('III', KM) .. r('HII', KC) .. r('III', KD)
    CARD_FMT = '<d' .. r('I', KRC) .. 'c6c12'
    REC_FMT = '<HHHddIHI'
    OUT_FMT = '<BdBHHffdBBBBBBBBHH'
end

local function bytes(raw, len)
    if raw then return { string.byte(raw, 1, len) } end
    local t = {}
    for i = 1, len do t[i] = 0 end
    return t
end

local function clamp8(v)
    if v > 255 then return 255 end
    return v
end

-- Slot rings are indexed by absolute slot number mod N; `head` is the newest event time applied.
-- Moving the head forward clears the slots it passes, so a gap longer than the window resets it.
local function advance(ring, S, N, head, ts)
    local h, s = floor(head / S), floor(ts / S)
    if s - h >= N then
        for j = 1, N do ring[j] = 0 end
    else
        for j = h + 1, s do ring[j % N + 1] = 0 end
    end
end

local function add(ring, S, N, head, ts, v, cap)
    local s = floor(ts / S)
    if s > floor(head / S) - N then
        local j = s % N + 1
        local x = ring[j] + v
        if cap and x > cap then x = cap end
        ring[j] = x
    end
end

-- Sum of the window ending at event time t, minus the recent transactions later than t that sit
-- in t's own slot (the only slot of t's window a later transaction can be in).
local function window(ring, S, N, head, t, rts, ramt)
    local s, h = floor(t / S), floor(head / S)
    local lo, hi = s - N + 1, s
    if h - N + 1 > lo then lo = h - N + 1 end
    if h < hi then hi = h end
    local sum = 0
    for j = lo, hi do sum = sum + ring[j % N + 1] end
    if hi == s then
        for k = 1, #rts do
            local r = rts[k]
            if r > t and floor(r / S) == s then
                sum = sum - (ramt and ramt[k] or 1)
            end
        end
    end
    if sum < 0 then sum = 0 end
    return sum
end

-- Recent event times, unsorted; a new one replaces the oldest when full.
local function remember(rts, ramt, K, ts, amount)
    local n = #rts
    if n < K then
        rts[n + 1] = ts
        if ramt then ramt[n + 1] = amount end
        return
    end
    local oldest = 1
    for k = 2, n do if rts[k] < rts[oldest] then oldest = k end end
    if ts > rts[oldest] then
        rts[oldest] = ts
        if ramt then ramt[oldest] = amount end
    end
end

local function recent_stats(rts, t)
    local c1m, prev = 0, -1
    for k = 1, #rts do
        local r = rts[k]
        if r <= t and r > t - MINUTE_MS then c1m = c1m + 1 end
        if r < t and r > prev then prev = r end
    end
    local since = -1
    if prev >= 0 then since = (t - prev) / 1000 end
    return c1m, since
end

-- Entity lists: parallel arrays id / first seen / last seen (Unix seconds), id 0 = empty slot.
-- Returns whether this is the first time the entity is seen (nothing earlier than tsec).
local function observe(e, K, id, tsec)
    local free, lru
    for k = 1, K do
        local eid = e.id[k]
        if eid == id then
            local new = e.first[k] > tsec
            if new then e.first[k] = tsec end
            if tsec > e.last[k] then e.last[k] = tsec end
            return new
        elseif eid == 0 then
            if not free then free = k end
        elseif not lru or e.last[k] < e.last[lru] then
            lru = k
        end
    end
    local k = free
    if not k and tsec > e.last[lru] then k = lru end
    if k then e.id[k], e.first[k], e.last[k] = id, tsec, tsec end
    return true
end

-- Read-only variant for a redelivered transaction, whose own observation is already stored.
local function was_first(e, K, id, tsec)
    for k = 1, K do
        if e.id[k] == id then return e.first[k] >= tsec end
    end
    return true
end

local function distinct(e, K, tsec, wsec)
    local c = 0
    for k = 1, K do
        if e.id[k] ~= 0 and e.first[k] <= tsec and e.last[k] > tsec - wsec then c = c + 1 end
    end
    return c
end

local function unpack_entities(v, i, K)
    local e = { id = {}, first = {}, last = {} }
    for k = 1, K do
        e.id[k], e.first[k], e.last[k] = v[i], v[i + 1], v[i + 2]
        i = i + 3
    end
    return e, i
end

local function push_entities(out, e, K)
    for k = 1, K do
        out[#out + 1] = e.id[k]; out[#out + 1] = e.first[k]; out[#out + 1] = e.last[k]
    end
end

local function offsets(rts, ramt, K, head, out)
    for k = 1, K do
        local r = rts[k]
        if r then
            local off = head - r
            if off > EMPTY - 1 then off = EMPTY - 1 end
            out[#out + 1] = off
        else
            out[#out + 1] = EMPTY
        end
        if ramt then out[#out + 1] = ramt[k] or 0 end
    end
end

local function empty_entities(K)
    local e = { id = {}, first = {}, last = {} }
    for k = 1, K do e.id[k], e.first[k], e.last[k] = 0, 0, 0 end
    return e
end

local function load_user(raw)
    local u = { rts = {}, ramt = {} }
    if not raw then
        u.head, u.n, u.mean = -1, 0, 0
        u.c1, u.c24, u.s24 = bytes(nil, N1H), bytes(nil, N24), bytes(nil, N24)
        u.m, u.c, u.d = empty_entities(KM), empty_entities(KC), empty_entities(KD)
        return u
    end
    local v = { struct.unpack(USER_FMT, raw) }
    u.head, u.n, u.mean = v[1], v[2], v[3]
    local i = 4
    for _ = 1, KR do
        local off = v[i]
        if off ~= EMPTY then
            u.rts[#u.rts + 1] = u.head - off
            u.ramt[#u.ramt + 1] = v[i + 1]
        end
        i = i + 2
    end
    u.c1, u.c24 = bytes(v[i], N1H), bytes(v[i + 1], N24)
    i = i + 2
    u.s24 = {}
    for k = 1, N24 do u.s24[k] = v[i]; i = i + 1 end
    u.m, i = unpack_entities(v, i, KM)
    u.c, i = unpack_entities(v, i, KC)
    u.d = unpack_entities(v, i, KD)
    return u
end

local function dump_user(u)
    local out = { u.head, u.n, u.mean }
    offsets(u.rts, u.ramt, KR, u.head, out)
    out[#out + 1] = string.char(unpack(u.c1))
    out[#out + 1] = string.char(unpack(u.c24))
    for k = 1, N24 do out[#out + 1] = u.s24[k] end
    push_entities(out, u.m, KM)
    push_entities(out, u.c, KC)
    push_entities(out, u.d, KD)
    return struct.pack(USER_FMT, unpack(out))
end

local function load_card(raw)
    local c = { rts = {} }
    if not raw then
        c.head, c.c1, c.c24 = -1, bytes(nil, N1H), bytes(nil, N24)
        return c
    end
    local v = { struct.unpack(CARD_FMT, raw) }
    c.head = v[1]
    for k = 2, KRC + 1 do
        if v[k] ~= EMPTY then c.rts[#c.rts + 1] = c.head - v[k] end
    end
    c.c1, c.c24 = bytes(v[KRC + 2], N1H), bytes(v[KRC + 3], N24)
    return c
end

local function dump_card(c)
    local out = { c.head }
    offsets(c.rts, nil, KRC, c.head, out)
    out[#out + 1] = string.char(unpack(c.c1))
    out[#out + 1] = string.char(unpack(c.c24))
    return struct.pack(CARD_FMT, unpack(out))
end

-- Apply one new transaction to a state that has rings c1/c24 and a recent list.
local function apply_velocity(st, ts, amount, ramt, K)
    if st.head < 0 then
        st.head = ts
    elseif ts > st.head then
        advance(st.c1, S1H, N1H, st.head, ts)
        advance(st.c24, S24, N24, st.head, ts)
        if st.s24 then advance(st.s24, S24, N24, st.head, ts) end
        st.head = ts
    end
    add(st.c1, S1H, N1H, st.head, ts, 1, 255)
    add(st.c24, S24, N24, st.head, ts, 1, 255)
    if st.s24 then add(st.s24, S24, N24, st.head, ts, amount) end
    remember(st.rts, ramt, K, ts, amount)
end

local function card_counts(c, t)
    if not c or c.head < 0 then return 0, 0, 0 end
    local c1m = recent_stats(c.rts, t)
    return c1m, window(c.c1, S1H, N1H, c.head, t, c.rts), window(c.c24, S24, N24, c.head, t, c.rts)
end

-- Mean amount of the user's transactions before event time t: the running mean with the recent
-- ones at or after t taken back out, so a redelivery sees what the original saw.
local function mean_before(u, t)
    local sum, count = u.n * u.mean, u.n
    for k = 1, #u.rts do
        if u.rts[k] >= t then
            sum = sum - u.ramt[k]
            count = count - 1
        end
    end
    if count <= 0 then return 0 end
    return sum / count
end

local function apply(u, c, ts, amount, mh, cc, dh)
    if c then apply_velocity(c, ts, 0, nil, KRC) end
    apply_velocity(u, ts, amount, u.ramt, KR)
    u.n = u.n + 1
    u.mean = u.mean + (amount - u.mean) / u.n
    local tsec = floor(ts / 1000)
    observe(u.m, KM, mh, tsec)
    if cc > 0 then observe(u.c, KC, cc, tsec) end
    if dh > 0 then observe(u.d, KD, dh, tsec) end
end

-- Features as of event time t, read-only: the state already holds the transaction itself.
local function evaluate(u, c, seen, t, mh, cc, dh)
    local tsec = floor(t / 1000)
    local c1m, since = recent_stats(u.rts, t)
    local cc1m, cc1h, cc24 = card_counts(c, t)
    return struct.pack(OUT_FMT, seen, t, clamp8(c1m),
        window(u.c1, S1H, N1H, u.head, t, u.rts),
        window(u.c24, S24, N24, u.head, t, u.rts),
        window(u.s24, S24, N24, u.head, t, u.rts, u.ramt),
        mean_before(u, t), since,
        distinct(u.m, KM, tsec, 3600), distinct(u.m, KM, tsec, 86400),
        distinct(u.c, KC, tsec, 3600), distinct(u.c, KC, tsec, 86400),
        (dh > 0 and was_first(u.d, KD, dh, tsec)) and 1 or 0,
        (cc > 0 and was_first(u.c, KC, cc, tsec)) and 1 or 0,
        was_first(u.m, KM, mh, tsec) and 1 or 0,
        clamp8(cc1m), cc1h, cc24)
end

local function split(s)
    local t = {}
    for v in string.gmatch(s, '[^%z]+') do t[#t + 1] = v end
    return t
end

-- One SMISMEMBER per non-empty list: operators' edits apply from the next batch on.
local function blocklist_flags(key, joined)
    if joined == '' or redis.call('SCARD', key) == 0 then return '' end
    local values = split(joined)
    local hits = redis.call('SMISMEMBER', key, unpack(values))
    local flags = {}
    for k = 1, #hits do flags[k] = hits[k] == 1 and '1' or '0' end
    return table.concat(flags)
end

local function features(keys, args)
    if not USER_FMT then init() end
    local n, n_users, n_cards = tonumber(args[1]), tonumber(args[2]), tonumber(args[3])
    local window_ms, ttl_ms, blob = args[4], args[5], args[6]

    local recs = {}
    local off = 1
    for k = 1, n do
        local pos, user, card, ts, amount, mh, cc, dh
        pos, user, card, ts, amount, mh, cc, dh, off = struct.unpack(REC_FMT, blob, off)
        recs[k] = { pos, user, card, ts, amount, mh, cc, dh }
    end
    local own_ms, seen_ms = {}, {}
    for k = 1, n do own_ms[recs[k][1]] = recs[k][4] end
    -- Dedup markers in batch order, so the first of two copies in one batch is the original.
    for i = 1, n do
        seen_ms[i] = false
        local old = redis.call('SET', keys[i], own_ms[i], 'NX', 'GET', 'PX', window_ms)
        if old then seen_ms[i] = tonumber(old) end
    end

    local state_keys = {}
    for j = 1, n_users + n_cards do state_keys[j] = keys[n + j] end
    local raws = redis.call('MGET', unpack(state_keys))

    local cards, card_dirty = {}, {}
    local function card_state(card)
        if card == 0 then return nil end
        local c = cards[card]
        if not c then
            c = load_card(raws[n_users + card])
            cards[card] = c
        end
        return c
    end

    local out = {}
    local k = 1
    while k <= n do
        local user = recs[k][2]
        local u = load_user(raws[user])
        local dirty = false
        local last = k
        while last < n and recs[last + 1][2] == user do last = last + 1 end

        -- New transactions in event-time order: each is applied, then sees the state as of itself.
        for q = k, last do
            local r = recs[q]
            local pos, card, ts = r[1], r[3], r[4]
            if not seen_ms[pos] then
                local c = card_state(card)
                apply(u, c, ts, r[5], r[6], r[7], r[8])
                if c then card_dirty[card] = true end
                dirty = true
                out[q] = evaluate(u, c, 0, ts, r[6], r[7], r[8])
            end
        end
        -- Redelivered ones after the whole group, at their original event time, so a copy later
        -- in the same batch than its original still sees it.
        for q = k, last do
            local r = recs[q]
            local t = seen_ms[r[1]]
            if t then out[q] = evaluate(u, card_state(r[3]), 1, t, r[6], r[7], r[8]) end
        end

        if dirty then redis.call('SET', keys[n + user], dump_user(u), 'PX', ttl_ms) end
        k = last + 1
    end
    for card in pairs(card_dirty) do
        redis.call('SET', keys[n + n_users + card], dump_card(cards[card]), 'PX', ttl_ms)
    end

    local b = n + n_users + n_cards
    return {
        table.concat(out),
        blocklist_flags(keys[b + 1], args[7]),
        blocklist_flags(keys[b + 2], args[8]),
        blocklist_flags(keys[b + 3], args[9]),
        blocklist_flags(keys[b + 4], args[10]),
    }
end

redis.register_function('fraudd_features', features)
