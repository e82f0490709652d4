"""Cheap liveness probe for a robot or sim: `python -m sim.health [tcp://127.0.0.1:5555] [--timeout 1]`.

With CURVE (`--client-key NAME.key_secret --server-public server.key`) the probe's key must be
among the robot's authorised keys, like any controller's.

Exits 0 and prints one status line when the robot answers a heartbeat within the timeout,
1 otherwise: usable as a docker compose health check. Imports only the protocol module (no
gymnasium, no MuJoCo), so a probe costs a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys
import time

from pathlib import Path

from maac_robot.runtime.auth import AuthError, client_curve
from maac_robot.runtime.protocol import DEFAULT_ENDPOINT, ProtocolError, RobotClient, RobotTimeout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sim.health", description=__doc__.splitlines()[0])
    parser.add_argument("endpoint", nargs="?", default=DEFAULT_ENDPOINT)
    parser.add_argument("--timeout", type=float, default=1.0, help="seconds to wait for the heartbeat reply")
    parser.add_argument("--client-key", type=Path, help="CURVE: the probe's NAME.key_secret (an authorised key)")
    parser.add_argument("--server-public", type=Path, help="CURVE: the robot's public NAME.key")
    args = parser.parse_args(argv)
    try:
        curve = client_curve(args.client_key, args.server_public)
        with RobotClient(args.endpoint, timeout_s=args.timeout, name="health", curve=curve) as client:
            start = time.perf_counter()
            status = client.status()
            rtt_ms = (time.perf_counter() - start) * 1000
    except (RobotTimeout, ProtocolError, AuthError) as err:
        print(f"unhealthy: {args.endpoint}: {err}", file=sys.stderr)
        return 1
    print(f"healthy: {args.endpoint} {status.env_id} {status.mode} episode={status.episode} step={status.step} "
          f"running={status.running} uptime={status.uptime_s:.0f}s rtt={rtt_ms:.2f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
