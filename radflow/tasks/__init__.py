"""Tasks: what differs between studies (model, loss, outputs, validation score)."""

from radflow.tasks.classification import BinaryClassification

TASKS = {BinaryClassification.name: BinaryClassification}


def get_task(name: str, **kwargs):
    """The task registered under `name` (config key `task`)."""
    if name not in TASKS:
        raise ValueError(f"config key 'task' must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](**kwargs)
