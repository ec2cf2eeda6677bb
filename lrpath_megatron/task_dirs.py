"""Local task directories for lm-evaluation-harness: the tasks shipped with lrpath and the user's own.

A task is a harness task YAML whose documents are local files (``dataset_path: json`` / csv / parquet / text
with ``data_files``): nothing is fetched from a hub. Task files are data: a YAML that would import Python
(``!function``) is refused. Every task is written, with its data files as absolute paths, into one include
directory that the harness reads alone (its built-in task index is not loaded).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from lrpath_megatron.errors import LrpathError

SHIPPED_DIR = Path(__file__).resolve().parent / "task_data"
# name -> what the task asks; documents in SHIPPED_DIR/<name>.jsonl (built by build_tasks.py)
SHIPPED = {
    "code_next_line": "which of four lines is the real next line of a Python snippet (three come from other files)",
    "docstring_match": "which of four docstring summaries belongs to a Python function's signature",
}
LOCAL_LOADERS = ("json", "csv", "parquet", "text", "arrow")


@dataclass(frozen=True)
class TaskSet:
    include_dir: Path  # the directory the harness reads (TaskManager include_path)
    names: tuple  # task names, in the order given


def shipped_config(name: str) -> dict:
    """The harness config of a shipped multiple-choice task (``context``, ``choices``, ``label`` per line)."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(SHIPPED_DIR / f"{name}.jsonl")}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        # the choices continue the context as they are (a code line after its newline, a docstring's text)
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


class _TaskLoader(yaml.SafeLoader):
    """safe_load that reads a tag such as ``!function`` as a marker instead of failing on it."""


_TAGGED = "!tagged:"
_TaskLoader.add_multi_constructor("!", lambda loader, tag, node: f"{_TAGGED}!{tag}")


def _read_task_yaml(path: Path) -> dict:
    try:
        config = yaml.load(path.read_text(), Loader=_TaskLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise LrpathError(f"task file {path} is not valid YAML: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise LrpathError(f"task file {path} has no `task: NAME`; a task directory holds harness task YAMLs")
    code = [k for k, v in config.items() if isinstance(v, str) and v.startswith(_TAGGED)]
    if code:
        raise LrpathError(f"task file {path}: {', '.join(code)} name Python code (!function); task files are "
                          f"data here: use fields of the documents (doc_to_text: FIELD) or Jinja templates")
    loader = config.get("dataset_path")
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if loader not in LOCAL_LOADERS or not files:
        raise LrpathError(f"task file {path}: dataset_path {loader!r} with data_files {files!r}; give a local "
                          f"loader ({', '.join(LOCAL_LOADERS)}) and dataset_kwargs.data_files (nothing is "
                          f"downloaded)")
    config["dataset_kwargs"]["data_files"] = _absolute(files, path.parent, path)
    return config


def _absolute(files, base: Path, where: Path):
    """``data_files`` (a path, a list or {split: path(s)}) resolved against the YAML's directory; each must exist."""
    if isinstance(files, dict):
        return {k: _absolute(v, base, where) for k, v in files.items()}
    if isinstance(files, list):
        return [_absolute(v, base, where) for v in files]
    path = (base / str(files)).resolve()
    if not path.is_file():
        raise LrpathError(f"task file {where}: data file {path} does not exist")
    return str(path)


def directory_tasks(directory: Path) -> list[dict]:
    """The task configs of a user's task directory (every *.yaml in it)."""
    configs = [_read_task_yaml(p) for p in sorted(directory.glob("*.yaml"))]
    if not configs:
        raise LrpathError(f"task directory {directory} holds no *.yaml task file")
    return configs


def task_configs(specs: list[str]) -> dict[str, dict]:
    """Task name -> harness config for shipped task names and task directories, checked (nothing written)."""
    configs: dict[str, dict] = {}
    for spec in specs:
        if spec in SHIPPED:
            found = [shipped_config(spec)]
        elif Path(spec).is_dir():
            found = directory_tasks(Path(spec))
        else:
            raise LrpathError(f"task {spec!r} is neither a shipped task ({', '.join(SHIPPED)}) nor a directory of "
                              f"task YAMLs")
        for config in found:
            if config["task"] in configs:
                raise LrpathError(f"task {config['task']!r} is given twice (in {spec!r}); name each task once")
            configs[config["task"]] = config
    if not configs:
        raise LrpathError("no tasks given: name shipped tasks or task directories")
    return configs


def resolve_tasks(specs: list[str], include_dir: Path) -> TaskSet:
    """Shipped task names and task directories -> one include directory of task YAMLs for the harness."""
    configs = task_configs(specs)
    include_dir.mkdir(parents=True, exist_ok=True)
    for name, config in configs.items():
        (include_dir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return TaskSet(include_dir, tuple(configs))
