-- The delivery log of `fraudd alerts`: one row per (alert, channel), the fraud log of the origin
-- design and the durable record of every delivery still to make. A row is written before its
-- stream entry is acked, so a crash never loses one; its status moves once to 'delivered' (the
-- record that the channel got it) or 'failed' (given up after --max-attempts, dead-lettered).
--   pending    to send individually when next_attempt_at is due
--   digest     grouped by storm control into the channel's digest due at next_attempt_at
--   delivered  sent (alone, or in digest digest_id); never sent again
--   failed     dead-lettered with last_error
-- A sender claims due rows by moving next_attempt_at one lease ahead: rows whose sender died are
-- due again when the lease runs out, and are sent again under the same webhook-id.
CREATE TABLE IF NOT EXISTS alert_deliveries (
    transaction_id   text        NOT NULL,
    channel          text        NOT NULL,
    status           text        NOT NULL CHECK (status IN ('pending', 'digest', 'delivered', 'failed')),
    attempts         integer     NOT NULL DEFAULT 0,
    last_error       text,
    stream_id        text        NOT NULL,
    alert            jsonb       NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    next_attempt_at  timestamptz NOT NULL,
    first_attempt_at timestamptz,
    last_attempt_at  timestamptz,
    delivered_at     timestamptz,
    digest_id        text,
    PRIMARY KEY (transaction_id, channel)
);

-- What the senders poll: only the rows still to send, so the index stays as small as the backlog.
CREATE INDEX IF NOT EXISTS alert_deliveries_due ON alert_deliveries (channel, next_attempt_at)
    WHERE status IN ('pending', 'digest');
CREATE INDEX IF NOT EXISTS alert_deliveries_created ON alert_deliveries (created_at);
