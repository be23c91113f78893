-- A challenger model (`fraudd run --shadow-model`) scores every transaction beside the champion:
-- its score, decision and version are stored on the same row, NULL when no challenger ran.
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS shadow_score real;
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS shadow_decision text
    CHECK (shadow_decision IN ('approve', 'review', 'decline'));
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS shadow_model_version text;
