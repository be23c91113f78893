"""``fraudd alerts``: every fraud alert delivered once to Slack, e-mail and signed webhooks."""
