"""Tasks: what differs between studies (the interface: `radflow.tasks.base.Task`).

Built in: classification (`radflow.tasks.classification`), segmentation
(`radflow.tasks.segmentation.task`) and localization (`radflow.tasks.localization.task`). A task of one's own is a
`Task` subclass in a module that registers it::

    from radflow.tasks import Task, register

    @register
    class Regression(Task):
        name = "regression"
        ...

and the study configuration selects it and names the module::

    task: regression
    task_modules: [my_lab.regression]   # an importable module, or a file: [tasks/regression.py]

The workflow (while it plans) and every stage script import `task_modules` before they
look the task up (`get_task`), so all of them see the same registry. tests/toy_task.py
is a complete example.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from radflow.config import ConfigError
from radflow.tasks.base import StageFile, Task
from radflow.tasks.classification import BinaryClassification
from radflow.tasks.localization.task import Localization
from radflow.tasks.segmentation.task import Segmentation

__all__ = [
    "TASKS",
    "StageFile",
    "Task",
    "get_task",
    "import_task_modules",
    "register",
    "task_options",
]

TASKS: dict[str, type[Task]] = {}


def register(task_cls: type[Task]) -> type[Task]:
    """Make `task_cls` available under its `name` (usable as a class decorator).

    Registering the same class again is a no-op; another class under a taken name is
    an error (two modules must not silently compete for one config value).
    """
    if not (isinstance(task_cls, type) and issubclass(task_cls, Task)):
        raise TypeError(f"register takes a subclass of radflow.tasks.Task, got {task_cls!r}")
    name = getattr(task_cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"task class {task_cls.__qualname__} has no `name`")
    taken = TASKS.get(name)
    if taken is not None and taken is not task_cls:
        raise ValueError(
            f"task name {name!r} is taken by {taken.__module__}.{taken.__qualname__}; "
            f"rename {task_cls.__module__}.{task_cls.__qualname__}"
        )
    TASKS[name] = task_cls
    return task_cls


def import_task_modules(entries: Iterable[str | os.PathLike]) -> None:
    """Import each entry of config `task_modules` (once per process), so that the tasks
    they register are found: an importable module name (``my_lab.tasks``), or the path
    of a .py file, relative to the working directory (the workflow's ``-d``)."""
    for entry in entries:
        text = os.fspath(entry)
        if text.endswith(".py"):
            _import_file(Path(text))
            continue
        try:
            importlib.import_module(text)
        except ModuleNotFoundError as error:
            raise ConfigError(
                f"task_modules: cannot import {text!r} ({error}); install it, put its "
                "folder on PYTHONPATH, or give the path of its .py file"
            ) from error


def _import_file(path: Path) -> None:
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(
            f"task_modules: file {str(path)!r} does not exist (relative paths start from "
            f"the working directory {Path.cwd()})"
        )
    # one module name per file, so that importing the file twice registers nothing twice
    name = "radflow_task_module_" + hashlib.sha256(str(path).encode()).hexdigest()[:16]
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def get_task(
    name: str, *, modules: Iterable[str | os.PathLike] = (), train=None, options=None
) -> Task:
    """The task registered under `name` (config `task`), after importing `modules`
    (config `task_modules`). `train`: the `radflow.train.TrainSettings` when training
    (the loss may read options from them), else None. `options`: the config section
    the task names (`Task.options_key`; `task_options` below), given to it as is."""
    import_task_modules(modules)
    if name not in TASKS:
        raise ConfigError(
            f"config key 'task' must be one of {sorted(TASKS)}, got {name!r} (a task of "
            "your own: list the module that registers it in config key 'task_modules')"
        )
    if options is None:
        return TASKS[name](train)
    return TASKS[name](train, options)


def task_options(config: dict) -> dict:
    """The config section of the study's task's own settings (`Task.options_key`, e.g.
    `segmentation:`), {} where it has none; the stages pass it on to `get_task`."""
    task = TASKS.get(config["task"])
    key = getattr(task, "options_key", None)
    return dict(config.get(key) or {}) if key else {}


register(BinaryClassification)
register(Segmentation)
register(Localization)
