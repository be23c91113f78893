#!lua name=fraudd
--[[
Behaviour features for one batch in one atomic call (FCALL fraudd_features).

Why a Function and not client round trips: Redis is the one single-threaded stage every worker
shares, so the whole batch is one call that reads all users' and cards' state with one MGET,
updates it in Lua and writes each back once (SET PX); the only per-transaction redis.call is the
dedup marker. Why packed strings: a fixed-size struct per user and card keeps memory bounded
whatever the rate, where a sorted set holds an entry per transaction.

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
-- window the current 2-hour slot and the 11 before it.
local S1H, N1H = 600000, 6
local S24, N24 = 7200000, 12
local MINUTE_MS = 60000
-- Recent transactions kept exactly (1-minute count, seconds since previous, and to take later
-- transactions back out of a slot when features are computed at an earlier event time).
local KR, KRC = 6, 4
-- Entities kept per user (least recently seen is evicted): merchants, countries, devices.
local KM, KC, KD = 4, 3, 3
local EMPTY = 4294967295

-- A state is the flat array struct.unpack returns, used in place: a table per entity or ring
-- would cost more Redis CPU than everything else in the call (measured: 4x).
-- User: head_ms, n, mean, KR x (recent ts, amount), N1H counts, N24 counts, N24 amount sums,
-- KM x (merchant, first s, last s), KC x (country, first, last), KD x (device, first, last).
local U_HEAD, U_N, U_MEAN, U_RECENT = 1, 2, 3, 4
local U_C1 = U_RECENT + 2 * KR
local U_C24 = U_C1 + N1H
local U_S24 = U_C24 + N24
local U_M = U_S24 + N24
local U_C = U_M + 3 * KM
local U_D = U_C + 3 * KC
local U_LEN = U_D + 3 * KD - 1
-- Card: head_ms, KRC x recent ts, N1H counts, N24 counts.
local C_HEAD, C_RECENT = 1, 2
local C_C1 = C_RECENT + KRC
local C_C24 = C_C1 + N1H
local C_LEN = C_C24 + N24 - 1

local USER_FMT, CARD_FMT, REC_FMT, OUT_FMT
local floor

-- The library's load environment has no `string` or `math`: bind them on first use.
local function init()
    floor = math.floor
    local r = string.rep
    USER_FMT = '<dId' .. r('If', KR) .. r('H', N1H + N24) .. r('f', N24)
        .. r('III', KM) .. r('HII', KC) .. r('III', KD)
    CARD_FMT = '<d' .. r('I', KRC) .. r('H', N1H + N24)
    REC_FMT = '<HHHddIHI'
    OUT_FMT = '<BdBHHffdBBBBBBBBHH'
end

-- Slot rings are indexed by absolute slot number mod N; the head is the newest event time
-- applied. Moving it forward clears the slots it passes, so a gap longer than the window resets.
local function advance(v, base, S, N, head, ts)
    local h, s = floor(head / S), floor(ts / S)
    if s - h >= N then
        for j = base, base + N - 1 do v[j] = 0 end
    else
        for j = h + 1, s do v[base + j % N] = 0 end
    end
end

local function add(v, base, S, N, head, ts, x, cap)
    local s = floor(ts / S)
    if s > floor(head / S) - N then
        local j = base + s % N
        local y = v[j] + x
        if y > cap then y = cap end
        v[j] = y
    end
end

-- Sum of the window ending at event time t, minus the recent transactions later than t in t's
-- own slot (the only slot of t's window a later transaction can be in). Recent entries are
-- (ts[, amount]) at rbase with the given stride; amounts are taken back when `amount` is set.
local function window(v, base, S, N, head, t, rbase, stride, K, amount)
    local s, h = floor(t / S), floor(head / S)
    local lo, hi = s - N + 1, s
    if h - N + 1 > lo then lo = h - N + 1 end
    if h < hi then hi = h end
    local sum = 0
    for j = lo, hi do sum = sum + v[base + j % N] end
    -- Only an evaluation before the head (out of order, redelivered) has later transactions.
    if hi == s and t < head then
        for k = rbase, rbase + (K - 1) * stride, stride do
            local r = v[k]
            if r > t and floor(r / S) == s then
                if amount then sum = sum - v[k + 1] else sum = sum - 1 end
            end
        end
    end
    if sum < 0 then sum = 0 end
    return sum
end

-- Recent event times (-1 = empty), unsorted; a new one replaces the oldest.
local function remember(v, rbase, stride, K, ts, amount)
    local oldest = rbase
    for k = rbase, rbase + (K - 1) * stride, stride do
        if v[k] < v[oldest] then oldest = k end
    end
    if ts > v[oldest] then
        v[oldest] = ts
        if amount then v[oldest + 1] = amount end
    end
end

local function recent_stats(v, rbase, stride, K, t)
    local c1m, prev = 0, -1
    for k = rbase, rbase + (K - 1) * stride, stride do
        local r = v[k]
        if r <= t and r > t - MINUTE_MS then c1m = c1m + 1 end
        if r < t and r > prev then prev = r end
    end
    if c1m > 255 then c1m = 255 end
    if prev < 0 then return c1m, -1 end
    return c1m, (t - prev) / 1000
end

-- Entity lists: (id, first seen, last seen) in Unix seconds, id 0 = empty slot.
local function observe(v, base, K, id, tsec)
    local slot
    for k = base, base + 3 * (K - 1), 3 do
        local eid = v[k]
        if eid == id then
            if v[k + 1] > tsec then v[k + 1] = tsec end
            if v[k + 2] < tsec then v[k + 2] = tsec end
            return
        elseif eid == 0 then
            if not slot or v[slot] ~= 0 then slot = k end
        elseif not slot or (v[slot] ~= 0 and v[k + 2] < v[slot + 2]) then
            slot = k
        end
    end
    if v[slot] == 0 or tsec > v[slot + 2] then
        v[slot], v[slot + 1], v[slot + 2] = id, tsec, tsec
    end
end

-- Whether no observation of the entity is earlier than tsec (the transaction's own one is stored).
local function first_time(v, base, K, id, tsec)
    for k = base, base + 3 * (K - 1), 3 do
        if v[k] == id then
            if v[k + 1] >= tsec then return 1 end
            return 0
        end
    end
    return 1
end

local function distinct(v, base, K, tsec, wsec)
    local c = 0
    for k = base, base + 3 * (K - 1), 3 do
        if v[k] ~= 0 and v[k + 1] <= tsec and v[k + 2] > tsec - wsec then c = c + 1 end
    end
    return c
end

-- Recent times are stored as offsets back from the head so they fit 32 bits.
local function load(raw, fmt, len, rbase, stride, K)
    local v
    if raw then
        v = { struct.unpack(fmt, raw) }
        local head = v[1]
        for k = rbase, rbase + (K - 1) * stride, stride do
            if v[k] == EMPTY then v[k] = -1 else v[k] = head - v[k] end
        end
    else
        v = {}
        for j = 1, len do v[j] = 0 end
        v[1] = -1
        for k = rbase, rbase + (K - 1) * stride, stride do v[k] = -1 end
    end
    return v
end

local function dump(v, fmt, len, rbase, stride, K)
    local head = v[1]
    for k = rbase, rbase + (K - 1) * stride, stride do
        local r = v[k]
        if r < 0 then
            v[k] = EMPTY
        elseif head - r >= EMPTY then
            v[k] = EMPTY - 1
        else
            v[k] = head - r
        end
    end
    return struct.pack(fmt, unpack(v, 1, len))
end

-- Mean amount of the user's transactions before event time t: the running mean with the recent
-- ones at or after t taken back out, so a redelivery sees what the original saw.
local function mean_before(u, t)
    local sum, count = u[U_N] * u[U_MEAN], u[U_N]
    for k = U_RECENT, U_RECENT + 2 * (KR - 1), 2 do
        if u[k] >= t then
            sum = sum - u[k + 1]
            count = count - 1
        end
    end
    if count <= 0 then return 0 end
    return sum / count
end

local function apply_card(c, ts)
    local head = c[C_HEAD]
    if ts > head then
        if head >= 0 then
            advance(c, C_C1, S1H, N1H, head, ts)
            advance(c, C_C24, S24, N24, head, ts)
        end
        head = ts
        c[C_HEAD] = ts
    end
    add(c, C_C1, S1H, N1H, head, ts, 1, 65535)
    add(c, C_C24, S24, N24, head, ts, 1, 65535)
    remember(c, C_RECENT, 1, KRC, ts)
end

local function apply_user(u, ts, amount, mh, cc, dh)
    local head = u[U_HEAD]
    if ts > head then
        if head >= 0 then
            advance(u, U_C1, S1H, N1H, head, ts)
            advance(u, U_C24, S24, N24, head, ts)
            advance(u, U_S24, S24, N24, head, ts)
        end
        head = ts
        u[U_HEAD] = ts
    end
    add(u, U_C1, S1H, N1H, head, ts, 1, 65535)
    add(u, U_C24, S24, N24, head, ts, 1, 65535)
    add(u, U_S24, S24, N24, head, ts, amount, math.huge)
    remember(u, U_RECENT, 2, KR, ts, amount)
    local n = u[U_N] + 1
    u[U_N] = n
    u[U_MEAN] = u[U_MEAN] + (amount - u[U_MEAN]) / n
    local tsec = floor(ts / 1000)
    observe(u, U_M, KM, mh, tsec)
    if cc > 0 then observe(u, U_C, KC, cc, tsec) end
    if dh > 0 then observe(u, U_D, KD, dh, tsec) end
end

-- Features as of event time t, read-only: the state already holds the transaction itself.
local function evaluate(u, c, seen, t, mh, cc, dh)
    local tsec = floor(t / 1000)
    local head = u[U_HEAD]
    local c1m, since = recent_stats(u, U_RECENT, 2, KR, t)
    -- An event older than a ring's reach still counts what the exact recent list knows of it.
    local c1h = math.max(window(u, U_C1, S1H, N1H, head, t, U_RECENT, 2, KR), c1m)
    local c24 = math.max(window(u, U_C24, S24, N24, head, t, U_RECENT, 2, KR), c1h)
    local cc1m, cc1h, cc24 = 0, 0, 0
    if c and c[C_HEAD] >= 0 then
        local chead = c[C_HEAD]
        cc1m = recent_stats(c, C_RECENT, 1, KRC, t)
        cc1h = math.max(window(c, C_C1, S1H, N1H, chead, t, C_RECENT, 1, KRC), cc1m)
        cc24 = math.max(window(c, C_C24, S24, N24, chead, t, C_RECENT, 1, KRC), cc1h)
    end
    local new_c, new_d = 0, 0
    if cc > 0 then new_c = first_time(u, U_C, KC, cc, tsec) end
    if dh > 0 then new_d = first_time(u, U_D, KD, dh, tsec) end
    return struct.pack(OUT_FMT, seen, t, c1m, c1h, c24,
        window(u, U_S24, S24, N24, head, t, U_RECENT, 2, KR, true),
        mean_before(u, t), since,
        distinct(u, U_M, KM, tsec, 3600), distinct(u, U_M, KM, tsec, 86400),
        distinct(u, U_C, KC, tsec, 3600), distinct(u, U_C, KC, tsec, 86400),
        new_d, new_c, first_time(u, U_M, KM, mh, tsec), cc1m, cc1h, cc24)
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
            c = load(raws[n_users + card], CARD_FMT, C_LEN, C_RECENT, 1, KRC)
            cards[card] = c
        end
        return c
    end

    local out = {}
    local k = 1
    while k <= n do
        local user = recs[k][2]
        local u = load(raws[user], USER_FMT, U_LEN, U_RECENT, 2, KR)
        local dirty = false
        local last = k
        while last < n and recs[last + 1][2] == user do last = last + 1 end

        -- New transactions in event-time order: each is applied, then sees the state as of itself.
        for q = k, last do
            local r = recs[q]
            local pos, card, ts = r[1], r[3], r[4]
            if not seen_ms[pos] then
                local c = card_state(card)
                if c then apply_card(c, ts) end
                apply_user(u, ts, r[5], r[6], r[7], r[8])
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

        if dirty then redis.call('SET', keys[n + user], dump(u, USER_FMT, U_LEN, U_RECENT, 2, KR), 'PX', ttl_ms) end
        k = last + 1
    end
    for card in pairs(card_dirty) do
        local c = dump(cards[card], CARD_FMT, C_LEN, C_RECENT, 1, KRC)
        redis.call('SET', keys[n + n_users + card], c, 'PX', ttl_ms)
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
