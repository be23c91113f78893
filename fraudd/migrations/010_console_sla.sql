-- Each queue's SLA, changed by a lead in the console (fraudd.console.sla). A row per queue from
-- the start, so a change locks its row: NULL until a lead sets it, and until then the console's
-- --sla-minutes holds. Who set it and when are shown on the page; the audit trail has every change.
CREATE TABLE IF NOT EXISTS console_slas (
    decision   text        PRIMARY KEY CHECK (decision IN ('review', 'decline')),
    sla        interval    CHECK (sla > interval '0'),
    changed_by text,
    changed_at timestamptz
);
INSERT INTO console_slas (decision) VALUES ('review'), ('decline') ON CONFLICT (decision) DO NOTHING;
