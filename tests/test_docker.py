"""docker/compose.yaml runs the same CLI the process-level tests exercise, and keeps the port private.

No Docker engine runs in CI, so this checks what can be checked without one: every service command
parses with `maac-robot`'s own parser and names a shipped config, the health check is the protocol
heartbeat probe, the ZeroMQ port is exposed on the compose network only, and (where Debian's
docker-compose is installed) `docker-compose config` accepts the file.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from maac_robot.cli import build_parser
from maac_robot.runtime.config import BUILTIN_CONFIGS, resolve_config

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker" / "compose.yaml"
ENV = {"TASK": "inverted_pendulum", "RUN": "demo", "EPISODES": "10"}


def _substitute(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${VAR:-default} interpolation with this test's values."""
    env = ENV if env is None else env
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1), m.group(2)), text)


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load(_substitute(COMPOSE.read_text()))["services"]


def _local_config(path: str) -> Path:
    """The config a service names: built-in names resolve inside the installed package, in any directory."""
    return resolve_config(path)


def test_sim_and_controller_commands_parse_with_the_cli(services):
    parser = build_parser()
    sim = parser.parse_args(services["sim"]["command"])
    assert sim.command == "sim" and sim.mode == "realtime" and _local_config(str(sim.config)).is_file()
    assert _local_config(str(sim.config)).parent == BUILTIN_CONFIGS  # shipped in the package, no COPY needed
    controller = parser.parse_args(services["controller"]["command"])
    assert controller.command == "control" and controller.connect == "tcp://sim:5555"
    assert _local_config(str(controller.config)).is_file()
    assert str(controller.artifacts).startswith("/data/artifacts/")


def test_the_link_is_authenticated_with_keys_from_the_keys_volume(services):
    parser = build_parser()
    sim = parser.parse_args(services["sim"]["command"])
    controller = parser.parse_args(services["controller"]["command"])
    assert str(sim.server_key).startswith("/keys/") and str(sim.authorized).startswith("/keys/")
    assert str(controller.client_key).startswith(str(sim.authorized))
    assert controller.server_public == sim.server_key.with_suffix(".key")
    probe = services["sim"]["healthcheck"]["test"]
    assert "--client-key" in probe and probe[probe.index("--client-key") + 1].startswith(str(sim.authorized))
    assert services["sim"]["depends_on"]["keys"]["condition"] == "service_completed_successfully"
    keys_cmd = services["keys"]["command"][0]
    for name in ("server", "controller", "health"):
        assert f"--name {name}" in keys_cmd


def _cli_commands(script: str) -> list[list[str]]:
    """Every `maac-robot ...` invocation in a service's shell command, as argv (without `maac-robot`)."""
    return [shlex.split(m.group(1)) for m in re.finditer(r"maac-robot ([^;]+)", script)]


def test_train_profile_trains_then_exports_with_cli_commands(services):
    train = services["train"]
    assert train["profiles"] == ["train"]
    parser = build_parser()
    commands = [parser.parse_args(argv) for argv in _cli_commands(train["command"][0])]
    assert [args.command for args in commands] == ["train", "train", "export"]  # resume, or start; then export
    resume, start, export = commands
    assert _local_config(str(start.config)).is_file()
    assert resume.resume == start.out == export.run and resume.steps == start.steps == 4000  # STEPS' default
    assert str(export.out).startswith("/data/artifacts/")


def _run_train_script(tmp_path: Path, env: dict[str, str]) -> list[str]:
    """The train service's shell command under sh, with /data in tmp_path and a maac-robot that logs its argv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    fake = bin_dir / "maac-robot"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    fake.chmod(0o755)
    compose = yaml.safe_load(_substitute(COMPOSE.read_text(), {**ENV, **env}))
    script = compose["services"]["train"]["command"][0].replace("/data/", f"{tmp_path}/data/")
    log.unlink(missing_ok=True)
    subprocess.run(["sh", "-c", script], check=True, env={"PATH": f"{bin_dir}:/usr/bin:/bin"})
    return log.read_text().splitlines()


def test_rerunning_train_continues_the_run_or_replaces_it_on_request(tmp_path):
    data = tmp_path / "data" / "runs" / "demo"
    first = _run_train_script(tmp_path, {"STEPS": "300"})
    assert first[0] == f"train --config inverted_pendulum --out {data} --steps 300" and first[1].startswith("export")
    (data / "checkpoints").mkdir(parents=True)
    (data / "checkpoints" / "latest.pt").write_bytes(b"")
    again = _run_train_script(tmp_path, {"STEPS": "600"})
    assert again[0] == f"train --resume {data} --steps 600"  # the same RUN continues, up to the new STEPS
    replaced = _run_train_script(tmp_path, {"STEPS": "600", "REPLACE": "1"})
    assert replaced[0].startswith("train --config") and not data.exists()


def test_up_exits_with_the_controller_and_a_one_shot_health_check(services):
    header = COMPOSE.read_text().split("services:")[0]
    assert "up --exit-code-from controller" in header  # the sim serves forever: up must stop with the controller
    assert "up --exit-code-from controller" in (ROOT / "README.md").read_text()
    health = services["health"]
    assert health["profiles"] == ["check"] and "restart" not in health  # one probe, then exit 0/1
    assert health["entrypoint"] == ["python", "-m", "sim.health"] and health["command"][0] == "tcp://sim:5555"
    sim = build_parser().parse_args(services["sim"]["command"])
    key = health["command"][health["command"].index("--client-key") + 1]
    assert key.startswith(str(sim.authorized)) and health["depends_on"]["sim"]["condition"] == "service_healthy"


def test_port_private_health_check_is_the_heartbeat_and_restarts_set(services):
    for name, svc in services.items():
        assert "ports" not in svc, f"{name} publishes a host port"
    assert services["sim"]["expose"] == ["5555"]
    assert services["sim"]["healthcheck"]["test"][:4] == ["CMD", "python", "-m", "sim.health"]
    assert services["controller"]["depends_on"]["sim"]["condition"] == "service_healthy"
    assert services["sim"]["restart"] and services["controller"]["restart"]
    assert any(v.startswith("artifacts:") for v in services["controller"]["volumes"])


def test_dockerfile_runs_as_non_root_with_cpu_torch():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root)\w+", text, re.M)
    assert "torch==2.13.0" in text and "/whl/cpu" in text
    assert '".[train,render]"' in text and "libegl1" in text  # video (sim --render, evaluate --video) headless
    assert "COPY configs" not in text  # the configs ship inside the package


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed")
def test_docker_compose_config_accepts_the_file():
    result = subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
