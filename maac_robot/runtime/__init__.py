"""The robot-side contract, torch-free: protocol messages and client, artifact manifest and loading,
recordings, the sim's and controller's config, errors. `pip install maac-robot` (no extras) installs
exactly what this package and `controller/` need, so a robot computer never carries the learner.
"""
