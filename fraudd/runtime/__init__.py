"""What every long-running fraudd process shares: supervision, metrics, logs, health."""
