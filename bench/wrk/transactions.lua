-- wrk script: POSTs of fresh transactions (a transaction_id never sent before, so every one is
-- written, none answered as a duplicate).
--   wrk ... -s transactions.lua URL -- <path> <run prefix> <items per request> [requests/s per connection]
-- items 1: one JSON object per request (/v1/transactions, /v1/score); items N > 1: a JSON array of
-- N (/v1/transactions/batch). paced.lua adds the rate: each connection waits 1/rate between its
-- requests, so the connections together offer a fixed load.

local thread_count = 0

function setup(thread)
  thread:set("thread_id", thread_count)
  thread_count = thread_count + 1
end

local path, prefix, items
local sent = 0
local now = os.time()

function init(args)
  path = args[1]
  prefix = string.format("%s_%d_", args[2], thread_id)
  items = tonumber(args[3])
  local per_connection = tonumber(args[4] or "0")
  interval_ms = per_connection > 0 and 1000 / per_connection or 0
  wrk.headers["Content-Type"] = "application/json"
  if args[5] then wrk.headers["Authorization"] = "Bearer " .. args[5] end
end

local function transaction()
  sent = sent + 1
  return string.format(
    '{"transaction_id":"%s%d","user_id":"user_%d","amount":%d.25,"merchant":"merchant_%d","timestamp":%d,"currency":"EUR","channel":"ecom"}',
    prefix, sent, sent % 20000, sent % 900 + 1, sent % 40, now - sent % 3600)
end

function request()
  local body
  if items == 1 then
    body = transaction()
  else
    local parts = {}
    for i = 1, items do parts[i] = transaction() end
    body = "[" .. table.concat(parts, ",") .. "]"
  end
  return wrk.format("POST", path, nil, body)
end
