-- The analyst console (`fraudd console`): cases, linked customers, notes, users, sessions and the
-- audit trail.
--
-- A case is a `review` or `decline` decision that analysts work. It is a table, not a view over
-- `transactions`: the console copies each new non-approve row in (fraudd.console.cases.sync), so
-- the queue's queries and their indexes touch only the cases, never the partitioned transactions.
-- What the console reads of new transactions (new cases, linked customers) it finds by scored_at
-- through a BRIN index: rows arrive in scored_at order, and a BRIN index adds next to nothing to
-- scoring's COPY (pages not yet summarized are always read, and they are the newest), where a
-- B-tree or GIN index over devices, IPs and cards doubled the COPY's cost per row.
CREATE INDEX IF NOT EXISTS transactions_scored ON transactions USING brin (scored_at) WITH (autosummarize = on);

CREATE TABLE IF NOT EXISTS cases (
    transaction_id text             PRIMARY KEY,
    event_time     timestamptz      NOT NULL,
    created_at     timestamptz      NOT NULL,  -- the decision's scored_at: a case's age counts from it
    user_id        text             NOT NULL,
    decision       text             NOT NULL CHECK (decision IN ('review', 'decline')),
    score          real             NOT NULL,
    amount         double precision NOT NULL,
    merchant       text             NOT NULL,
    country        text,
    reasons        text[]           NOT NULL DEFAULT '{}',
    -- Time-invariant priority: score and amount, plus age in SLA units written as -created_at/SLA,
    -- so ordering by it is ordering by the priority at any moment (now() is the same for every row).
    rank           double precision NOT NULL,
    state          text             NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'claimed', 'resolved')),
    assignee       text,
    lease_until    timestamptz,
    claimed_at     timestamptz,
    verdict        text             CHECK (verdict IN ('fraud', 'legit')),
    typology       text,
    resolved_by    text,
    resolved_at    timestamptz,
    CHECK ((state = 'resolved') = (verdict IS NOT NULL))
);
-- The queue's orders over the unresolved cases of one queue and state: priority (breached first is
-- a range on created_at, each side read in rank order), score, amount and age; resolved ones by
-- when. Each lets the first page be read in order instead of sorting every open case.
CREATE INDEX IF NOT EXISTS cases_queue ON cases (decision, state, rank DESC) WHERE state <> 'resolved';
CREATE INDEX IF NOT EXISTS cases_created ON cases (decision, state, created_at) WHERE state <> 'resolved';
CREATE INDEX IF NOT EXISTS cases_score ON cases (decision, state, score DESC) WHERE state <> 'resolved';
CREATE INDEX IF NOT EXISTS cases_amount ON cases (decision, state, amount DESC) WHERE state <> 'resolved';
CREATE INDEX IF NOT EXISTS cases_newest ON cases (created_at);
CREATE INDEX IF NOT EXISTS cases_assignee ON cases (assignee) WHERE state = 'claimed';
CREATE INDEX IF NOT EXISTS cases_resolved ON cases (decision, resolved_at DESC) WHERE state = 'resolved';
CREATE INDEX IF NOT EXISTS cases_merchant ON cases (merchant);
CREATE INDEX IF NOT EXISTS cases_user ON cases (user_id);
CREATE INDEX IF NOT EXISTS cases_reasons ON cases USING gin (reasons);

-- Linked customers: who was seen on each device, IP address and card ('device:<id>', 'ip:<addr>',
-- 'card:<id>'), and from when to when; kept by the console's housekeeping from the new
-- transactions (fraudd.console.links), so a case page reads a few rows instead of the transactions.
CREATE TABLE IF NOT EXISTS entity_customers (
    entity     text        NOT NULL,
    user_id    text        NOT NULL,
    first_seen timestamptz NOT NULL,
    last_seen  timestamptz NOT NULL,
    PRIMARY KEY (entity, user_id)
);

-- How far each of the console's syncs has read `transactions` (by scored_at).
CREATE TABLE IF NOT EXISTS console_watermarks (
    name      text        PRIMARY KEY,
    scored_at timestamptz NOT NULL
);

-- Cases per state of each queue, as the console's housekeeping last counted them: what the queue
-- page shows, read as one row instead of counting every open case on every page.
CREATE TABLE IF NOT EXISTS console_queue_counts (
    decision     text        PRIMARY KEY,
    open         integer     NOT NULL,
    claimed      integer     NOT NULL,
    breached     integer     NOT NULL,
    resolved_24h integer     NOT NULL,
    newest       timestamptz,
    counted_at   timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS case_notes (
    id             bigserial   PRIMARY KEY,
    transaction_id text        NOT NULL REFERENCES cases ON DELETE CASCADE,
    author         text        NOT NULL,
    body           text        NOT NULL CHECK (length(body) BETWEEN 1 AND 4000),
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS case_notes_case ON case_notes (transaction_id, created_at);

CREATE TABLE IF NOT EXISTS console_users (
    username      text        PRIMARY KEY CHECK (username ~ '^[A-Za-z0-9._@-]{1,64}$'),
    role          text        NOT NULL CHECK (role IN ('analyst', 'lead', 'admin')),
    password_hash text        NOT NULL,
    disabled      boolean     NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- A session is known by the SHA-256 of its cookie's token: a leaked table opens no session.
CREATE TABLE IF NOT EXISTS console_sessions (
    token_hash bytea       PRIMARY KEY,
    username   text        NOT NULL REFERENCES console_users ON DELETE CASCADE,
    csrf_token text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    last_seen  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS console_sessions_seen ON console_sessions (last_seen);

-- Every action, append-only: the trigger refuses UPDATE, DELETE and TRUNCATE.
CREATE TABLE IF NOT EXISTS console_audit (
    id             bigserial   PRIMARY KEY,
    at             timestamptz NOT NULL DEFAULT clock_timestamp(),
    actor          text        NOT NULL,
    action         text        NOT NULL,
    transaction_id text,
    subject        text,
    before         jsonb,
    after          jsonb,
    address        text
);
CREATE INDEX IF NOT EXISTS console_audit_case ON console_audit (transaction_id, at) WHERE transaction_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS console_audit_failed_logins ON console_audit (subject, at) WHERE action = 'login_failed';

CREATE OR REPLACE FUNCTION console_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'console_audit is append-only';
END
$fn$;
DROP TRIGGER IF EXISTS console_audit_no_change ON console_audit;
CREATE TRIGGER console_audit_no_change BEFORE UPDATE OR DELETE ON console_audit
    FOR EACH ROW EXECUTE FUNCTION console_audit_append_only();
DROP TRIGGER IF EXISTS console_audit_no_truncate ON console_audit;
CREATE TRIGGER console_audit_no_truncate BEFORE TRUNCATE ON console_audit
    FOR EACH STATEMENT EXECUTE FUNCTION console_audit_append_only();
