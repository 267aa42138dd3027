"""The code layout's contracts: a cheap public API, no import cycles, model_utils never importing training."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model_utils", "training")
MAX_LINES = 400


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `path` imports anywhere in its body (function-level imports included: a cycle dodged by
    importing inside a function is still a cycle)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def test_public_api_imports_without_deepspeed():
    code = (
        "import sys\n"
        "from model_utils import create_critic_model, create_hf_model, RewardModel, load_tokenizer, "
        "save_reward_model, load_reward_model\n"
        "from training import TrainConfig, load_preference_data, train\n"
        "assert 'deepspeed' not in sys.modules, 'deepspeed imported'\n"
        "import model_utils, training\n"
        "assert 'deepspeed' not in sys.modules\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_package_roots_are_cheap():
    code = (
        "import sys, model_utils, training, training.data, model_utils.checkpoint; print(sorted(sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    loaded = result.stdout
    assert result.returncode == 0 and "'transformers'" not in loaded and "'torch'" not in loaded, (
        result.stderr
    )


def test_no_import_cycles_and_model_utils_never_imports_training():
    modules = project_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    assert not [
        name
        for name in graph
        if name.startswith("model_utils")
        and any(dependency.startswith("training") for dependency in graph[name])
    ]
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dependency in sorted(graph[name]):
            assert state.get(dependency) != 1, f"import cycle: {' -> '.join([*path, name, dependency])}"
            if dependency not in state:
                visit(dependency, [*path, name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_no_module_over_the_line_budget_without_a_reason():
    long = [
        str(path.relative_to(ROOT))
        for path in project_modules().values()
        if len(path.read_text(encoding="utf-8").splitlines()) > MAX_LINES
        and "longer than" not in path.read_text(encoding="utf-8")[:2000]
    ]
    assert long == []
