"""maac-robot: Model-Augmented Actor-Critic (Clavera et al., ICLR 2020) from training to deployment.

Two parts with one contract between them: `maac_robot.runtime` (torch-free: protocol, artifacts,
recordings, the robot side's config) and `maac_robot.learn` (torch: ensemble, agent, trainer,
export). This module imports neither, so a robot computer without torch can import the package.
"""

__version__ = "0.1.0"
