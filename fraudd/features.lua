#!lua name=fraudd
--[[
Commit of one batch's behaviour state (FCALL fraudd_commit): per user, compare-and-set of its
state together with its transactions' dedup markers, all in one atomic call.

Why so little here: the arithmetic runs in the workers (fraudd/behaviour.py), because Redis is the
single-threaded process they all share. Redis only checks that nobody wrote the state since it was
read and stores the new one, so a transaction is counted once however many workers race on a user.

KEYS: [1..u]  user state keys, then each user's dedup markers, users in the same order, then the
      four blocklist sets (merchant, device, ip, country)
ARGV: dedup_window_ms, state_ttl_ms, u, state size, then four strings, fixed-width fields (few
      large arguments cost both sides far less than one argument per field):
      counts  per user, its marker count, 8 decimal digits
      olds    per user, its state as read (all zero bytes = absent; a real state never is)
      news    per user, its new state
      values  per marker, the transaction's event time in ms, 20 decimal digits
      then per blocklist the batch's distinct values, NUL-joined ('' = don't look)
Reply: { conflicts, then per blocklist a string of '0'/'1' flags in the order of its values }.
      conflicts is flat, per user left unchanged: user number (1-based), the number k of its markers that
      already existed, then k pairs (marker number within the user, 1-based; the stored value).
      k = 0 means the state changed since it was read. Empty when every user was written.
]]

local function split(s)
    local t = {}
    for v in string.gmatch(s, '[^%z]+') do t[#t + 1] = v end
    return t
end

-- Read here rather than in the worker's read so an empty list (the usual case) costs one SCARD,
-- and operators' edits apply from the next batch on.
local function blocklist_flags(key, joined)
    if joined == '' or redis.call('SCARD', key) == 0 then return '' end
    local values = split(joined)
    local hits = redis.call('SMISMEMBER', key, unpack(values))
    local flags = {}
    for k = 1, #hits do flags[k] = hits[k] == 1 and '1' or '0' end
    return table.concat(flags)
end

local function commit(keys, args)
    local window_ms, ttl_ms, n_users, size = args[1], args[2], tonumber(args[3]), tonumber(args[4])
    local counts, olds, news, values = args[5], args[6], args[7], args[8]
    local absent = string.rep('\0', size)
    local conflicts = {}
    local mk = n_users
    for u = 1, n_users do
        local m = tonumber(string.sub(counts, 8 * u - 7, 8 * u))
        local at = size * (u - 1)
        if (redis.call('GET', keys[u]) or absent) ~= string.sub(olds, at + 1, at + size) then
            conflicts[#conflicts + 1] = u
            conflicts[#conflicts + 1] = 0
        else
            -- Every marker is tried, so one retry learns all of this user's known transactions.
            local seen, set = {}, {}
            for i = mk + 1, mk + m do
                local ms = tonumber(string.sub(values, 20 * i - 20 * n_users - 19, 20 * (i - n_users)))
                local old = redis.call('SET', keys[i], ms, 'NX', 'GET', 'PX', window_ms)
                if old then
                    seen[#seen + 1] = i - mk
                    seen[#seen + 1] = old
                else
                    set[#set + 1] = keys[i]
                end
            end
            if #seen == 0 then
                redis.call('SET', keys[u], string.sub(news, at + 1, at + size), 'PX', ttl_ms)
            else
                if #set > 0 then redis.call('DEL', unpack(set)) end
                conflicts[#conflicts + 1] = u
                conflicts[#conflicts + 1] = #seen / 2
                for j = 1, #seen do conflicts[#conflicts + 1] = seen[j] end
            end
        end
        mk = mk + m
    end
    local b = #keys - 4
    return { conflicts, blocklist_flags(keys[b + 1], args[9]), blocklist_flags(keys[b + 2], args[10]),
             blocklist_flags(keys[b + 3], args[11]), blocklist_flags(keys[b + 4], args[12]) }
end

redis.register_function('fraudd_commit', commit)
