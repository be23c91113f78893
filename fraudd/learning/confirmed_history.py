"""The label-fed confirmed-fraud counts of a labelled history, point in time.

Live, a transaction's ``CONFIRMED_COLUMNS`` (``fraudd.scoring.confirmed``) count the frauds at its
merchant, device, IP and card whose labels had arrived when it was scored. A training row must see
exactly that and nothing later: a chargeback comes back days or weeks after the fraud, and a model
that learnt from counts which already included it would learn from the future and fail live. So a
row at event time ``t`` counts a fraud ``f`` of the same entity when ``f`` was reported at or before
``t`` and its own event time lies in ``(t - window, t]``, the rule the live counts apply. A history
that does not say when a label was reported is given ``event time + delay``.
"""

from __future__ import annotations

import numpy as np

from fraudd.scoring.confirmed import CONFIRMED_COLUMNS, WINDOWS

DEFAULT_LABEL_DELAY_S = 7 * 86_400.0


def confirmed_counts(
    entities: tuple[list[str | None], ...], event_ms: np.ndarray, is_fraud: np.ndarray, reported_ms: np.ndarray
) -> np.ndarray:
    """The ``CONFIRMED_COLUMNS`` of every row (float32, rows × columns).

    ``entities`` are the rows' merchant, device, IP and card columns (``confirmed.KINDS``' order);
    ``reported_ms`` is when each fraud's label was reported (only the fraud rows' values matter).
    """
    n = len(event_ms)
    out = np.zeros((n, len(CONFIRMED_COLUMNS)), dtype=np.float32)
    for k, column in enumerate(entities):
        values = np.array(["" if v is None else v for v in column], dtype=str)
        known = values != ""
        codes = np.unique(values, return_inverse=True)[1]
        fraud_codes = np.unique(codes[is_fraud & known])
        if len(fraud_codes) == 0:
            continue
        # Only rows sharing an entity with some fraud can count anything: group those by entity.
        candidates = np.flatnonzero(np.isin(codes, fraud_codes) & known)
        order = candidates[np.argsort(codes[candidates], kind="stable")]
        starts = np.flatnonzero(np.diff(codes[order], prepend=-1))
        for group in np.split(order, starts[1:]):
            frauds = group[is_fraud[group]]
            times, reported = event_ms[frauds], reported_ms[frauds]
            now = event_ms[group][:, None]
            seen = (times[None, :] <= now) & (reported[None, :] <= now)
            for w, (_name, span) in enumerate(WINDOWS):
                out[group, k * len(WINDOWS) + w] = np.count_nonzero(seen & (times[None, :] > now - span), axis=1)
    return out
