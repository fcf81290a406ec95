"""Deployment files checked without a Docker engine: hadolint on the Dockerfile, the compose files as
docker-compose merges them, shellcheck on the scripts, and the container's health check against a live
HTTP server. The image itself is built and run by docker/smoke-test.sh."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import require_tool
from service_helpers import ROOT

DOCKER = ROOT / "docker"


def tool(name: str) -> str:
    return require_tool(name, ".ci/run installs it: see its package list")


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_dockerfile_passes_hadolint() -> None:
    result = run(tool("hadolint"), "docker/Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_pass_shellcheck() -> None:
    scripts = sorted(str(p.relative_to(ROOT)) for p in DOCKER.glob("*.sh"))
    assert "docker/smoke-test.sh" in scripts
    result = run(tool("shellcheck"), *scripts)
    assert result.returncode == 0, result.stdout + result.stderr


def compose_config(*files: str) -> dict[str, Any]:
    args = [a for f in files for a in ("-f", f)]
    result = run(tool("docker-compose"), *args, "config")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_compose_reserves_a_gpu_and_the_cpu_override_runs_without() -> None:
    gpu = compose_config("docker-compose.yml")
    assert [d["driver"] for d in devices(gpu["siam"])] == ["nvidia"]
    assert gpu["siam"]["environment"]["SIAM_DEVICE"] == "cuda"
    assert "profiles" not in gpu["siam"] and gpu["nginx"]["profiles"] == ["scale"]

    cpu = compose_config("docker-compose.yml", "docker-compose.cpu.yml")
    assert cpu["siam"]["profiles"] == ["gpu"]  # the GPU service is off by default
    assert devices(cpu["siam-cpu"]) == []
    assert cpu["siam-cpu"]["environment"]["SIAM_DEVICE"] == "cpu"
    assert "siam" in cpu["siam-cpu"]["networks"]["default"]["aliases"]  # what Prometheus and nginx resolve
    assert cpu["siam-cpu"]["image"] == cpu["siam"]["image"]
    assert cpu["siam-cpu"]["build"]["dockerfile"] == "docker/Dockerfile"
    mounts = [v["source"] if isinstance(v, dict) else v.split(":")[0] for v in cpu["prometheus"]["volumes"]]
    assert str(DOCKER / "prometheus") in mounts


class Health(BaseHTTPRequestHandler):
    status = 503

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/health/ready" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_container_healthcheck_follows_readiness(health_server: ThreadingHTTPServer) -> None:
    env = {**os.environ, "SIAM_PORT": str(health_server.server_address[1])}

    def check() -> int:
        return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")], env=env, capture_output=True,
                              timeout=30).returncode

    Health.status = 503
    assert check() == 1
    Health.status = 200
    assert check() == 0
    health_server.shutdown()
    health_server.server_close()
    assert check() == 1  # nothing listening


def _debian_mirror() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("debian_mirror", DOCKER / "debian_mirror.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_debian_mirror_read_from_one_line_sources(tmp_path: Any) -> None:
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [signed-by=/k.gpg arch=amd64] http://mirror.corp.example/debian-security bookworm-security main\n"
        "deb-src http://src.corp.example/debian bookworm main\n"
        "deb http://mirror.corp.example/debian/ bookworm main contrib # trailing comment\n")
    mirror = _debian_mirror()
    assert mirror.debian_mirror(tmp_path, "bookworm") == "http://mirror.corp.example/debian"


def test_debian_mirror_read_from_deb822_sources_and_prefers_the_wanted_suite(tmp_path: Any) -> None:
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    (parts / "a-vendor.sources").write_text(
        "Types: deb\nURIs: https://vendor.example/node\nSuites: nodistro\nComponents: main\n")
    (parts / "b-debian.sources").write_text(
        "Types: deb\n# a comment line\nURIs: http://old.corp.example/debian\nSuites: bullseye\nComponents: main\n\n"
        "Types: deb\nURIs: http://off.corp.example/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n\n"
        "Types: deb deb-src\nURIs: http://new.corp.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n")
    (parts / "ignored.list.disabled").write_text("deb http://disabled.example/debian bookworm main\n")
    mirror = _debian_mirror()
    assert mirror.debian_mirror(tmp_path, "bookworm") == "http://new.corp.example/debian"
    assert mirror.debian_mirror(tmp_path, "trixie") == "http://old.corp.example/debian"  # any Debian release


def test_debian_mirror_none_and_build_base_stops_with_a_message(tmp_path: Any) -> None:
    (tmp_path / "sources.list").write_text("deb https://packages.vendor.example/apt vendor-stable main\n")
    mirror = _debian_mirror()
    assert mirror.debian_mirror(tmp_path, "bookworm") is None
    assert mirror.main(["--apt-dir", str(tmp_path)]) == 1
    # build-base.sh with no mirror anywhere stops before debootstrap, naming the variable to set.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    python = fake_bin / "python3"
    python.write_text(f"#!/bin/sh\ncase \"$1\" in *debian_mirror.py) exec {sys.executable} \"$@\" --apt-dir "
                      f"{tmp_path};; esac\nexec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "SIAM_DEBIAN_MIRROR"}
    result = subprocess.run(["bash", "docker/build-base.sh"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={**env, "PYTHON": str(python)})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "SIAM_DEBIAN_MIRROR" in result.stderr


def tiny_wheel(folder: Path, name: str = "siam_probe", version: str = "1.0") -> Path:
    """A wheel of one module, written by hand: something pip can install without any network."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}.py": "VALUE = 42\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},,\n" for path in files) + f"{dist}/RECORD,,\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in {**files, f"{dist}/RECORD": record}.items():
            z.writestr(path, text)
    return wheel


@pytest.mark.timeout(180)
@pytest.mark.parametrize("source", ["wheels", "index"])
def test_image_dependencies_install_from_the_wheels_or_else_from_the_index(tmp_path: Path, source: str) -> None:
    """docker/install-deps.sh, the image's first stage, outside Docker: with wheels in docker/wheels/ it
    installs from them alone (no index reachable); with none, from PIP_INDEX_URL (here a file:// index)."""
    venv, wheels, index = tmp_path / "venv", tmp_path / "wheels", tmp_path / "index"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    wheels.mkdir()
    project = index / "simple" / "siam-probe"
    project.mkdir(parents=True)
    wheel = tiny_wheel(wheels if source == "wheels" else project)
    (project / "index.html").write_text(f'<a href="{wheel.name}">{wheel.name}</a>\n')  # PEP 503, for file://
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("siam-probe==1.0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, SIAM_WHEELS=str(wheels), SIAM_VENV=str(venv),
               SIAM_REQUIREMENTS=str(requirements), PIP_DISABLE_PIP_VERSION_CHECK="1",
               # Offline must not look at any index: one that cannot answer proves it.
               PIP_INDEX_URL="http://127.0.0.1:9/simple/" if source == "wheels" else project.parent.as_uri())
    done = subprocess.run(["sh", str(ROOT / "docker" / "install-deps.sh")], env=env, capture_output=True,
                          text=True, timeout=150)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    expected = "from the 1 wheels of docker/wheels/ (offline)" if source == "wheels" else \
        f"holds no wheels; from {project.parent.as_uri()}"
    assert expected in done.stdout
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import siam_probe; print(siam_probe.VALUE)"],
                           capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "42"


def test_image_requirements_are_the_project_dependencies_and_its_build_tools() -> None:
    import tomllib

    listed = subprocess.run([sys.executable, str(ROOT / "docker" / "requirements.py"), str(ROOT / "pyproject.toml")],
                            capture_output=True, text=True, check=True).stdout.split()
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert listed == [*dependencies, "setuptools>=69", "wheel"]
