"""The container images agree with the project: no container engine runs here, so what can be
checked without building them is checked (pins, user, ports, the chart's expectations)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]


def _pyproject() -> dict[str, object]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert isinstance(project, dict)
    return project


def _arg(dockerfile: str, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", (ROOT / dockerfile).read_text(), re.MULTILINE)
    assert match is not None, f"{dockerfile} has no ARG {name}"
    return match.group(1)


def _pins(*args: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "pins.py"), *args], check=True, capture_output=True, text=True
    ).stdout
    return out.split()


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_install_the_torch_pyproject_pins(dockerfile: str) -> None:
    dependencies = _pyproject()["dependencies"]
    assert isinstance(dependencies, list)
    assert f"torch=={_arg(dockerfile, 'TORCH_VERSION')}" in dependencies


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_run_as_the_user_and_expose_the_ports_the_chart_expects(dockerfile: str) -> None:
    text = (ROOT / dockerfile).read_text()
    values = yaml.safe_load((ROOT / "helm" / "fedprint" / "values.yaml").read_text())
    user, group = values["securityContext"]["runAsUser"], values["securityContext"]["runAsGroup"]
    runtime = text.rsplit("\nFROM ", 1)[1]  # the last stage is what runs
    assert f"\nUSER {user}:{group}\n" in runtime
    assert f"--uid {user} --gid {group}" in runtime
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", runtime, re.MULTILINE).group(1).split()}  # type: ignore[union-attr]
    assert exposed == set(values["ports"].values())
    assert 'ENTRYPOINT ["fedprint"]' in runtime
    assert "protos/generate.py" in text  # the stubs are built in


def test_the_cuda_image_swaps_faiss_cpu_for_faiss_gpu() -> None:
    requirements = _pins("--runtime", "--except", "faiss-cpu", "torch")
    assert not [r for r in requirements if r.startswith(("faiss", "torch"))]
    assert "grpcio==1.85.1" in requirements and "psycopg[binary]==3.3.9" in requirements
    assert _arg("Dockerfile.cuda", "FAISS_GPU").startswith("faiss-gpu-cu12==")
    assert "pip install --no-deps ." in (ROOT / "Dockerfile.cuda").read_text()


def test_pins_are_read_from_pyproject_and_unknown_ones_are_refused() -> None:
    assert _pins("grpcio-tools", "mypy-protobuf") == ["grpcio-tools==1.85.1", "mypy-protobuf==5.1.0"]
    failed = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "pins.py"), "no-such-package"], capture_output=True, text=True
    )
    assert failed.returncode != 0 and "no-such-package" in failed.stderr


def test_the_chart_deploys_the_version_pyproject_builds() -> None:
    chart = yaml.safe_load((ROOT / "helm" / "fedprint" / "Chart.yaml").read_text())
    assert chart["appVersion"] == _pyproject()["version"]
