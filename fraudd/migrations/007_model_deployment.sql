-- The models a deployment can run, the one it runs, and every change of it (`fraudd retrain`,
-- `fraudd models promote|rollback`). Scoring workers poll model_deployment.generation once a
-- second and swap models at a batch boundary when it moves: no restart, no SIGHUP.

-- Every model registered for this deployment: its file (the same path on every scoring host) and
-- the thresholds it decides with here, calibrated to the deployment's review/decline budget.
CREATE TABLE IF NOT EXISTS models (
    version           text             PRIMARY KEY,
    path              text             NOT NULL,
    review_threshold  double precision NOT NULL CHECK (review_threshold BETWEEN 0 AND 1),
    decline_threshold double precision NOT NULL CHECK (decline_threshold BETWEEN review_threshold AND 1),
    calibration       jsonb            NOT NULL DEFAULT '{}',
    registered_at     timestamptz      NOT NULL DEFAULT now()
);

-- What the workers run: one row, absent until the first retrain or promotion (the workers then run
-- --model-path, --thresholds and --shadow-model). generation grows with every change.
CREATE TABLE IF NOT EXISTS model_deployment (
    singleton  boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    champion   text        NOT NULL REFERENCES models (version),
    shadow     text        REFERENCES models (version),
    generation bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- The audit log: who changed the champion (or kept it), when, why, and on what figures.
--   retrain-promoted  a retrain's candidate beat the champion by the margin and decides now
--   retrain-kept      it did not (reason says why); it runs in shadow
--   promote           promoted by hand        rollback   an earlier champion restored by hand
CREATE TABLE IF NOT EXISTS model_promotions (
    id               bigserial   PRIMARY KEY,
    at               timestamptz NOT NULL DEFAULT now(),
    action           text        NOT NULL CHECK (action IN ('retrain-promoted', 'retrain-kept', 'promote', 'rollback')),
    model_version    text        NOT NULL REFERENCES models (version),
    previous_version text        REFERENCES models (version),
    actor            text        NOT NULL,
    reason           text        NOT NULL,
    comparison       jsonb
);
CREATE INDEX IF NOT EXISTS model_promotions_at ON model_promotions (at);
