"""maac-robot: Model-Augmented Actor-Critic (Clavera et al., ICLR 2020) from training to deployment.

Kept import-light on purpose: the controller imports `maac_robot.protocol` and
`maac_robot.artifacts` on a robot computer that has no torch.
"""

__version__ = "0.1.0"
