"""Per-stage conda environments (envs/<stage>.yaml), checked statically.

Conda cannot run on the machine these tests run on (no conda channel is reachable), so
the environments are never built here. Instead these tests prove, from the source text:

- every rule that runs code (script/shell/run) names a `conda:` env file that exists;
- every env file is YAML with `channels` and `dependencies`;
- every third-party module that a rule's script imports, directly or through the radflow
  modules it imports (followed recursively with `ast`, lazy imports inside functions
  included), is provided by that rule's env (import name mapped to its conda package);
- each env's version bounds agree with pyproject.toml's lower bounds.

radflow itself is not installed into the envs: every script puts the workflow's own
directory first on sys.path (see scripts/*.py), so the package next to the Snakefile is
the one imported, inside a conda env or not.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = "radflow"

# import name -> conda-forge package name, where they differ
CONDA_NAME = {
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "PIL": "pillow",
    "torch": "pytorch",
    "torchvision": "torchvision",
    "matplotlib": "matplotlib-base",
    "skimage": "scikit-image",
    "cv2": "opencv",
    "SimpleITK": "simpleitk",
    # pydicom's pixel-decoder plugins (installed from PyPI in envs/dicom.yaml)
    "libjpeg": "pylibjpeg-libjpeg",
    "openjpeg": "pylibjpeg-openjpeg",
    "rle": "pylibjpeg-rle",
    "zlib_ng": "python-zlib-ng",
}
# conda package -> PyPI distribution name in pyproject.toml, where they differ
PYPI_NAME = {"pytorch": "torch", "matplotlib-base": "matplotlib", "python-zlib-ng": "zlib-ng"}
# conda packages that satisfy an import under another package's name
PROVIDES = {"matplotlib": {"matplotlib-base"}}

_RULE = re.compile(r"^(?P<indent>[ \t]*)(?:rule|checkpoint)\s+(?P<name>\w+)\s*:", re.M)
_DIRECTIVE = re.compile(r"^\s+(?P<key>\w+):\s*(?P<value>.*)$")
_ACTIONS = {"script", "shell", "run", "notebook", "wrapper"}


# ------------------------------------------------------------------ rule parsing
def parse_rules(smk_text: str) -> dict[str, dict[str, str]]:
    """{rule name: {directive: first-line value}} of every rule/checkpoint in a .smk text.

    A rule's block is every line indented deeper than its `rule x:` line; directives are
    the lines one level inside it (`conda:` with the value on the next line included).
    """
    rules: dict[str, dict[str, str]] = {}
    lines = smk_text.splitlines()
    for match in _RULE.finditer(smk_text):
        indent = len(match["indent"].expandtabs())
        start = smk_text.count("\n", 0, match.start()) + 1
        body: list[str] = []
        for line in lines[start:]:
            if line.strip() and len(line) - len(line.lstrip()) <= indent:
                break
            body.append(line)
        directive_indent = min(
            (len(b) - len(b.lstrip()) for b in body if b.strip()), default=indent + 4
        )
        directives: dict[str, str] = {}
        for i, line in enumerate(body):
            m = _DIRECTIVE.match(line)
            if not m or len(line) - len(line.lstrip()) != directive_indent:
                continue
            value = m["value"].strip()
            if not value and i + 1 < len(body):
                value = body[i + 1].strip()
            directives[m["key"]] = value.strip("\"',")
        rules[match["name"]] = directives
    return rules


def workflow_rules() -> dict[str, dict[str, str]]:
    rules = {}
    for smk in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))]:
        for name, directives in parse_rules(smk.read_text()).items():
            assert name not in rules, f"rule {name} defined twice"
            rules[name] = directives
    return rules


# ---------------------------------------------------------------- import walking
def _module_file(module: str, root: Path) -> Path | None:
    """The source file of a first-party module (package __init__ or module.py)."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(t, ast.Name) and t.id in ("ImportError", "ModuleNotFoundError")
               for t in types)  # fmt: skip


def _imports_of(path: Path, module: str | None) -> set[str]:
    """Fully qualified names imported anywhere in `path` (functions' bodies included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if module and path.name == "__init__.py" else (module or "").rpartition(".")[0]
    names: set[str] = set()
    # An import guarded by `try: ... except ImportError:` has a fallback: it is optional.
    optional = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.Try) and any(_catches_import_error(h) for h in node.handlers)
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{node.module}" if node.module else parent
            else:
                base = node.module or ""
            if base == "__future__":
                continue
            names.add(base)
            # `from radflow import figures` imports the submodule radflow.figures
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def third_party_imports(script: Path, root: Path = REPO) -> set[str]:
    """Top-level names of the non-stdlib, non-radflow modules `script` needs at run time,
    following the radflow modules it imports (and their parents' __init__) recursively."""
    seen: set[str] = set()
    found: set[str] = set()
    todo: list[tuple[Path, str | None]] = [(script, None)]
    while todo:
        path, module = todo.pop()
        for name in _imports_of(path, module):
            top = name.split(".")[0]
            if top != FIRST_PARTY:
                if top not in sys.stdlib_module_names:
                    found.add(top)
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b too
                sub = ".".join(parts[:i])
                if sub in seen:
                    continue
                source = _module_file(sub, root)
                if source is not None:
                    seen.add(sub)
                    todo.append((source, sub))
    return found


# ------------------------------------------------------------------- env files
_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)\s*(?P<constraint>.*)$")


def _specs(deps) -> dict[str, str]:
    packages = {}
    for dep in deps:
        m = _SPEC.match(str(dep).split("::")[-1].strip())
        packages[m["name"].lower().replace("_", "-")] = m["constraint"].replace(" ", "")
    return packages


def env_packages(env: dict) -> dict[str, str]:
    """{conda package: version constraint} of an env's conda dependencies, without
    `pip` itself (the installer of the `pip:` list, needs no bound)."""
    deps = [d for d in env["dependencies"] if not isinstance(d, dict)]
    return {k: v for k, v in _specs(deps).items() if k != "pip"}


def env_pip_packages(env: dict) -> dict[str, str]:
    """{PyPI distribution: version constraint} of an env's `pip:` list, if any."""
    pip = [d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    return _specs(pip[0]) if pip else {}


def all_env_packages(env: dict) -> dict[str, str]:
    return {**env_packages(env), **env_pip_packages(env)}


def missing_from_env(modules: set[str], packages: dict[str, str]) -> set[str]:
    """Imported modules whose conda package is not among `packages`."""
    missing = set()
    for module in modules:
        conda = CONDA_NAME.get(module, module).lower()
        if conda not in packages and not (PROVIDES.get(module, set()) & set(packages)):
            missing.add(f"{module} (conda package {conda})")
    return missing


def _lower_bound(constraint: str) -> tuple[int, ...] | None:
    """The version a constraint starts at: ">=1.2" or an exact pin "==1.2" -> (1, 2)."""
    m = re.search(r"(?:>=|==)\s*([0-9][0-9.]*)", constraint)
    return tuple(int(p) for p in m[1].strip(".").split(".")) if m else None


def pyproject_lower_bounds() -> dict[str, tuple[int, ...]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        deps.extend(extra)
    bounds = {}
    for dep in deps:
        m = _SPEC.match(dep.split(";")[0].strip())
        bound = _lower_bound(m["constraint"])
        if bound:
            bounds[m["name"].lower()] = bound
    return bounds


def _env_path(rule: str, directives: dict[str, str], smk_dir: Path) -> Path:
    return (smk_dir / directives["conda"]).resolve()


# ---------------------------------------------------------------------- tests
RULES = workflow_rules()
ACTION_RULES = {n: d for n, d in RULES.items() if _ACTIONS & set(d)}
ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))


def test_every_rule_that_runs_code_has_a_conda_env():
    assert {"index", "convert", "preprocess", "train", "figures"} <= set(ACTION_RULES)
    # rules `all` and `ablation` only collect targets: they run nothing, so they need no
    # environment
    assert set(RULES) - set(ACTION_RULES) == {"all", "ablation"}
    for name, directives in ACTION_RULES.items():
        assert "conda" in directives, f"rule {name} has no conda: directive"
        env = _env_path(name, directives, REPO / "rules")
        assert env.is_file(), f"rule {name}: conda env {env} does not exist"
        assert env.parent == REPO / "envs", f"rule {name}: env outside envs/"


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.stem)
def test_env_file_is_a_conda_environment(env_file):
    env = yaml.safe_load(env_file.read_text())
    assert isinstance(env, dict), env_file
    assert env.get("channels") and all(isinstance(c, str) for c in env["channels"])
    assert "defaults" not in env["channels"]  # licence and reproducibility: conda-forge only
    packages = env_packages(env)
    assert "python" in packages
    if env_pip_packages(env):  # a pip: list needs pip in the env
        assert "pip" in _specs(d for d in env["dependencies"] if not isinstance(d, dict))
    for name, constraint in all_env_packages(env).items():
        assert constraint, f"{env_file.name}: {name} has no version bound"


def test_every_env_file_is_used_by_a_rule():
    used = {_env_path(n, d, REPO / "rules") for n, d in ACTION_RULES.items()}
    assert set(ENV_FILES) == used


@pytest.mark.parametrize("rule", sorted(ACTION_RULES), ids=str)
def test_env_provides_every_module_the_rule_imports(rule):
    directives = ACTION_RULES[rule]
    assert "script" in directives, f"rule {rule}: only script: rules are checked"
    script = (REPO / "rules" / directives["script"]).resolve()
    modules = third_party_imports(script)
    env = yaml.safe_load(_env_path(rule, directives, REPO / "rules").read_text())
    missing = missing_from_env(modules, all_env_packages(env))
    assert not missing, f"rule {rule} ({script.name}) imports modules its env lacks: {missing}"


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda p: p.stem)
def test_env_versions_agree_with_pyproject(env_file):
    bounds = pyproject_lower_bounds()
    python_bound = _lower_bound(
        tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    )
    for name, constraint in all_env_packages(yaml.safe_load(env_file.read_text())).items():
        pypi = "python" if name == "python" else PYPI_NAME.get(name, name)
        expected = python_bound if pypi == "python" else bounds.get(pypi)
        assert expected is not None, f"{env_file.name}: {name} is not declared in pyproject.toml"
        assert _lower_bound(constraint) == expected, (
            f"{env_file.name}: {name} {constraint} but pyproject.toml says >= "
            + ".".join(map(str, expected))
        )


# ------------------------------------------- the checks can fail: synthetic cases
def test_a_new_import_missing_from_the_env_is_caught(tmp_path):
    """A script whose radflow module lazily imports a package the env lacks."""
    (tmp_path / "radflow" / "sub").mkdir(parents=True)
    (tmp_path / "radflow" / "__init__.py").write_text("import numpy\n")
    (tmp_path / "radflow" / "sub" / "__init__.py").write_text("")
    (tmp_path / "radflow" / "sub" / "deep.py").write_text(
        "import os\n\ndef f():\n    from sklearn.metrics import roc_auc_score\n"
    )
    (tmp_path / "radflow" / "top.py").write_text(
        "from .sub import deep\nimport yaml\ntry:\n    import zlib_ng\nexcept ImportError:\n"
        "    zlib_ng = None  # optional: a fallback exists\n"
    )
    script = tmp_path / "script.py"
    script.write_text("import sys\nfrom radflow.top import thing\n")
    modules = third_party_imports(script, root=tmp_path)
    assert modules == {"numpy", "sklearn", "yaml"}
    env = {"dependencies": ["python >=3.10", "numpy >=1.26", "pyyaml >=6.0"]}
    assert missing_from_env(modules, env_packages(env)) == {"sklearn (conda package scikit-learn)"}
    env["dependencies"].append("scikit-learn >=1.4")
    assert missing_from_env(modules, env_packages(env)) == set()


def test_a_rule_without_env_is_caught():
    text = (
        "rule a:\n    input:\n        'x'\n    conda:\n        '../envs/a.yaml'\n"
        "    script:\n        '../scripts/a.py'\n\n\n"
        "if SYNTHETIC:\n\n    rule b:\n        output:\n            'y'\n"
        "        shell:\n            'touch {output}'\n"
    )
    rules = parse_rules(text)
    assert rules["a"]["conda"] == "../envs/a.yaml" and rules["a"]["script"] == "../scripts/a.py"
    assert "shell" in rules["b"] and "conda" not in rules["b"]


def test_version_known_without_installing_radflow(monkeypatch):
    """The conda envs do not install radflow; sidecars still name its version."""
    from importlib import metadata

    from radflow.dicom import radflow_version

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    expected = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert radflow_version() == expected != "unknown"
