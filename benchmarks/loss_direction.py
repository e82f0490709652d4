"""Realtime control through a lossy link, by direction: which losses does a policy survive?

    python benchmarks/loss_direction.py --artifacts artifacts/faults-ip [--loss 0.1] [--episodes 3] [--steps 300]

An in-thread realtime sim of the artifacts' env (episodes capped at `--steps`), `sim.faults.LossyProxy`
losing `--loss` of the actions only, of the observations only, or of both, and the policy planner
through `controller.run.run_episode`. Prints the return of every episode per direction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from controller.loop import GRAPHS  # noqa: E402
from controller.run import make_controller, run_episode  # noqa: E402
from maac_robot.runtime.artifacts import load_artifacts  # noqa: E402
from maac_robot.runtime.config import ControllerConfig  # noqa: E402
from maac_robot.runtime.protocol import RobotClient  # noqa: E402
from sim.faults import lossy_proxy  # noqa: E402
from sim_helpers import running_sim  # noqa: E402

DIRECTIONS = {"actions": "to_robot", "observations": "from_robot", "both": "both"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--loss", type=float, default=0.1)
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300, help="episode cap")
    args = parser.parse_args()
    artifacts = load_artifacts(args.artifacts, graphs=GRAPHS)
    controller = make_controller(artifacts, ControllerConfig(planner="policy"), "policy", 0)
    try:
        for name, direction in DIRECTIONS.items():
            with running_sim(artifacts.manifest.env_id, mode="realtime", max_episode_steps=args.steps) as sim, \
                    lossy_proxy(sim.endpoint, args.loss, seed=1, direction=direction) as proxy, \
                    RobotClient(proxy.endpoint, 1.0) as client:
                client.hello()
                rets = [run_episode(client, controller, seed).ret for seed in range(args.episodes)]
            print(f"{name} lost at {args.loss:.0%}: returns {' / '.join(f'{r:.0f}' for r in rets)} "
                  f"(cap {args.steps}; {proxy.counters.dropped} messages dropped)", flush=True)
    finally:
        controller.close()


if __name__ == "__main__":
    main()
