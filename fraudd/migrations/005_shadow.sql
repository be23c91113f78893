-- A challenger model (`fraudd run --shadow-model`) scores every transaction beside the champion:
-- its score, decision ('approve' | 'review' | 'decline') and version are stored on the same row,
-- NULL when no challenger ran. Plain nullable columns, without a constraint or default: the only
-- kind of column TimescaleDB adds to a hypertable whose chunks are already compressed.
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS shadow_score real;
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS shadow_decision text;
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS shadow_model_version text;
