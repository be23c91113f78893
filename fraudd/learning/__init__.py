"""Learning each team's fraud: a second traffic simulator, training on a team's own labelled
history, thresholds calibrated from its traffic."""
