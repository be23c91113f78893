"""A stored decision's explanation, read back and laid out for a person (``fraudd explain``).

The explanation is the one the deciding model computed when it decided (``transactions.explanation``,
see ``fraudd.scoring.explain``), never recomputed: behaviour features depend on the state at that
moment, which no later computation can reproduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fraudd.schema import connect


@dataclass(frozen=True, slots=True)
class StoredDecision:
    transaction_id: str
    decision: str
    score: float
    reasons: list[str]
    model_version: str
    explanation: dict | None


def stored_decision(postgres_url: str, pg_schema: str, transaction_id: str) -> StoredDecision | None:
    """The stored decision of ``transaction_id``, or None when no row has that id."""
    with connect(postgres_url, pg_schema) as conn:
        row = conn.execute(
            """SELECT transaction_id, decision, score, reasons, model_version, explanation
               FROM transactions WHERE transaction_id = %s""",
            (transaction_id,),
        ).fetchone()
    return None if row is None else StoredDecision(row[0], row[1], float(row[2]), list(row[3]), row[4], row[5])


def format_explanation(stored: StoredDecision) -> str:
    """The decision, then every feature's contribution, strongest first, with its value."""
    lines = [
        f"{stored.transaction_id}: {stored.decision}, score {stored.score:.6f}, model {stored.model_version}",
        f"reasons: {', '.join(stored.reasons) or '-'}",
    ]
    explanation = stored.explanation
    if explanation is None:
        lines.append(
            "no explanation stored: the model explains every review and decline decision"
            if stored.decision == "approve"
            else "no explanation stored: the deciding model carries no node covers (train it again with `fraudd train`)"
        )
        return "\n".join(lines)
    contributions = explanation["contributions"]
    values = explanation.get("values", {})
    raw = explanation["base"] + sum(contributions.values())
    lines.append(f"base (log-odds) {explanation['base']:+.4f}; raw score {raw:+.4f} = probability {1 / (1 + math.exp(-raw)):.6f}")
    lines.append(f"{'feature':<28} {'value':>14} {'contribution':>13}")
    for name, contribution in sorted(contributions.items(), key=lambda item: -abs(item[1])):
        if contribution != 0:
            lines.append(f"{name:<28} {values.get(name, float('nan')):>14.4f} {contribution:>+13.4f}")
    return "\n".join(lines)
