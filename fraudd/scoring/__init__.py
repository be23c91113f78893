"""Scoring: the batch of transactions turned into decisions, stored and settled."""
