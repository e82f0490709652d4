"""Sweeps: every (variant x seed) of a config as its own run directory, trained in parallel through Ray.

`maac-robot sweep` (`runner`) plans the trials, runs the unfinished ones as Ray tasks (a local Ray instance
on loopback, or an existing cluster with `--address`), and writes `evaluations.csv` (`records`);
`maac-robot report` (`report`) draws the mean curves and tabulates the interquartile mean with its bootstrap
confidence interval (`stats`). Only `runner` imports Ray, and only when a sweep runs: `records` and `stats`
are torch- and Ray-free, and the benchmarks reuse them.
"""
