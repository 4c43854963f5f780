"""The tasks behind the pipeline's stages, by (task, dataset): one registry the pipeline and the CLI ask.

    classification / fashion_mnist   ClassificationTask (tasks/classification.py, the default)
    classification / imagenet        ImageFolderTask    (tasks/imagefolder.py: any ImageFolder tree)
    detection / fashion_mnist        DetectionTask      (tasks/detection.py: the generated detection set)
    detection / coco                 CocoTask           (tasks/coco.py)
    lm / python_stdlib               LanguageModelTask  (tasks/lm.py: bytes of text files, perplexity)

A new task is one file: a `Task` subclass (tasks/base.py states the contract) registered with
`register_task("name", "dataset", cls)`; `hawq run --task name --dataset dataset` then runs it.
"""

from __future__ import annotations

from importlib import import_module

from hawq.tasks.base import Task

# the built-in tasks, imported on first use (detection pulls in torchvision's detection models)
_BUILTIN = {
    ("classification", "fashion_mnist"): "hawq.tasks.classification:ClassificationTask",
    ("classification", "imagenet"): "hawq.tasks.imagefolder:ImageFolderTask",
    ("detection", "fashion_mnist"): "hawq.tasks.detection:DetectionTask",
    ("detection", "coco"): "hawq.tasks.coco:CocoTask",
    ("lm", "python_stdlib"): "hawq.tasks.lm:LanguageModelTask",
}
_REGISTRY: dict[tuple[str, str], type[Task] | str] = dict(_BUILTIN)
_INSTANCES: dict[tuple[str, str], Task] = {}


def register_task(task: str, dataset: str, cls: type[Task]) -> type[Task]:
    """Make `cls` the task behind `--task task --dataset dataset` (replacing an earlier one)."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise TypeError(f"{cls!r} is not a hawq.tasks.Task subclass")
    _REGISTRY[(task, dataset)] = cls
    _INSTANCES.pop((task, dataset), None)
    return cls


def task_names() -> tuple[str, ...]:
    return tuple(dict.fromkeys(t for t, _ in _REGISTRY))


def dataset_names(task: str | None = None) -> tuple[str, ...]:
    return tuple(dict.fromkeys(d for t, d in _REGISTRY if task is None or t == task))


def task_class(task: str, dataset: str) -> type[Task]:
    """The registered class; a one-line ValueError naming the choices otherwise."""
    if task not in task_names():
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(task_names())}")
    entry = _REGISTRY.get((task, dataset))
    if entry is None:
        raise ValueError(f"the {task} task does not read {dataset!r}: use {' or '.join(dataset_names(task))}")
    if isinstance(entry, str):
        module, name = entry.split(":")
        entry = _REGISTRY[(task, dataset)] = getattr(import_module(module), name)
    return entry


def task_defaults(task: str) -> dict:
    """The defaults of a task (of its first registered dataset): what RunConfig fills in."""
    if task not in task_names():
        return {}
    return {**Task.defaults, **task_class(task, dataset_names(task)[0]).defaults}


def get_task(cfg) -> Task:
    """The task object of a run configuration (one per (task, dataset), reused)."""
    key = (cfg.task, cfg.dataset)
    if key not in _INSTANCES:
        _INSTANCES[key] = task_class(*key)()
    return _INSTANCES[key]


__all__ = ["Task", "dataset_names", "get_task", "register_task", "task_class", "task_defaults", "task_names"]
