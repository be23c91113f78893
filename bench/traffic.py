"""The transactions every mode sends: the generator's seeded, labelled stream."""

from __future__ import annotations

import time

from fraudd.generator import GeneratorConfig, TransactionGenerator

DAY_S = 86_400.0
# fraudd migrate creates daily partitions from yesterday to a week ahead; event times stay in
# this many days from yesterday's midnight so no row lands in the default partition.
PARTITIONED_DAYS = 8
# The generator's default pace: with its 20,000 users that is ~4 transactions per user per day,
# the behaviour the model was trained on.
NATURAL_TX_PER_S = 1.0
NATURAL_USERS = 20_000


def generator(seed: int, transactions: int, event_rate: float | None = None) -> TransactionGenerator:
    """A generator whose first ``transactions`` have event times inside the partitioned days.

    Event time is simulated history replayed at the benchmark's speed, not wall-clock time: the
    model scores behaviour relative to each user's own past, so the per-user pace must stay the
    one it was trained on, whatever the send rate. Longer runs speed up event time just enough to
    stay inside the partitions and add users in proportion, keeping each user's pace.

    ``event_rate`` (tx/s of event time) sets the pace instead, users again in proportion: at a
    production's rate a batch spans a second or a minute of event time, as in production, rather
    than the minutes of the natural pace (dedup markers are grouped per minute of event time, so
    the span decides how many buckets a batch writes)."""
    start = (time.time() // DAY_S - 1) * DAY_S
    pace = max(NATURAL_TX_PER_S, transactions / (PARTITIONED_DAYS * DAY_S), event_rate or 0.0)
    users = int(NATURAL_USERS * pace / NATURAL_TX_PER_S)
    return TransactionGenerator(GeneratorConfig(seed=seed, start_ts=start, tx_per_second=pace, n_users=users))
