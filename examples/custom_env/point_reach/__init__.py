"""PointReach: a point mass in a round arena that should come to rest at the centre, as your own Gymnasium env.

Importing this module registers the env with Gymnasium and its closed-form task with maac-robot, which is
why a config names the env `point_reach:PointReach-v0`: maac-robot imports `point_reach` before looking the
id up, in every process that builds the env (train, evaluate, export, diagnose, sim).

    PointReach-v0         reward and termination registered below: MAAC differentiates through them, exactly
    PointReachLearned-v0  the same env with nothing registered: the ensemble learns the reward and a termination
                          head (or declare `env.terminates: false` for an env that never terminates)

The task functions are named as "module:function" strings, so this module imports no torch: the sim, which
imports it too, runs without torch.
"""

import gymnasium as gym

from maac_robot import register_task

gym.register(id="PointReach-v0", entry_point="point_reach.env:PointReachEnv", max_episode_steps=200)
gym.register(id="PointReachLearned-v0", entry_point="point_reach.env:PointReachEnv", max_episode_steps=200)

register_task("PointReach-v0", reward_fn="point_reach.task:reward", termination_fn="point_reach.task:terminated")
