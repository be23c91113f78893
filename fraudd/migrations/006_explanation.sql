-- The model's exact explanation of every non-approved decision: {"base": <log-odds>,
-- "contributions": {"<feature>": <log-odds>, ...}, "values": {"<feature>": <value>, ...}}, with
-- base + the sum of contributions equal to the model's raw score. NULL for approved rows and for
-- decisions of a model that carries no node covers. A plain nullable column, as TimescaleDB needs
-- for a hypertable whose chunks are already compressed.
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS explanation jsonb;
