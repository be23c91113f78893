-- Rule sets as data: every version of the rules (the TOML language of fraudd/scoring/rules.toml,
-- kept verbatim) is one immutable row; only its status moves, draft -> shadow -> live -> retired,
-- and a retired or shadow version may become live again (a rollback is a publish of it). At most
-- one version is live and at most one is in shadow, which the partial unique indexes enforce.
CREATE TABLE IF NOT EXISTS rule_sets (
    version     integer     GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source      text        NOT NULL,
    digest      text        NOT NULL,
    status      text        NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'shadow', 'live', 'retired')),
    author      text        NOT NULL,
    note        text        NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE UNIQUE INDEX IF NOT EXISTS rule_sets_one_live ON rule_sets (status) WHERE status = 'live';
CREATE UNIQUE INDEX IF NOT EXISTS rule_sets_one_shadow ON rule_sets (status) WHERE status = 'shadow';

-- The source of a version never changes: a change is a new version.
CREATE OR REPLACE FUNCTION fraudd_rule_sets_immutable() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.source IS DISTINCT FROM OLD.source OR NEW.author IS DISTINCT FROM OLD.author
       OR NEW.version IS DISTINCT FROM OLD.version OR NEW.created_at IS DISTINCT FROM OLD.created_at THEN
        RAISE EXCEPTION 'rule set % is immutable: import a new version instead', OLD.version;
    END IF;
    RETURN NEW;
END
$fn$;
DROP TRIGGER IF EXISTS rule_sets_immutable ON rule_sets;
CREATE TRIGGER rule_sets_immutable BEFORE UPDATE ON rule_sets FOR EACH ROW EXECUTE FUNCTION fraudd_rule_sets_immutable();

-- Who did what to the rules, and when: every import, shadow, publish, rollback, test and blocklist
-- edit. Append-only: updates and deletes are refused.
CREATE TABLE IF NOT EXISTS rules_audit (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor       text        NOT NULL,
    action      text        NOT NULL,
    version     integer     REFERENCES rule_sets (version),
    detail      jsonb       NOT NULL DEFAULT '{}'
);
CREATE OR REPLACE FUNCTION fraudd_rules_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'rules_audit is append-only';
END
$fn$;
DROP TRIGGER IF EXISTS rules_audit_append_only ON rules_audit;
CREATE TRIGGER rules_audit_append_only BEFORE UPDATE OR DELETE ON rules_audit
    FOR EACH STATEMENT EXECUTE FUNCTION fraudd_rules_audit_append_only();

-- Per decision: the rule set that made it, the rule set in shadow and what it would have decided,
-- and the feature vector it was made from (float32 bytes, fraudd.scoring.vectors), which `fraudd
-- rules test` evaluates candidate sets on. Plain nullable columns, as TimescaleDB needs for a
-- hypertable whose chunks are already compressed.
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS rules_version text;
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS shadow_rules_version text;
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS shadow_rules_decision text;
ALTER TABLE transactions ADD COLUMN IF NOT EXISTS features bytea;
