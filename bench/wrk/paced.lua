-- transactions.lua at a fixed rate per connection (its 4th argument, requests/s per connection).
dofile(os.getenv("FRAUDD_WRK_DIR") .. "/transactions.lua")

function delay()
  return interval_ms
end
