"""What a ServerApp run is about: the settings Flower passes (flat run config) and the task (shapes, test set).

Flower's run config is flat, so fedseek passes only the path of the full YAML (a scenario or a
deployed coordinator's config), its kind and the output directory; everything else is typed
YAML (fedseek.config).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flwr.app import Context

from fedseek.config import CoordinatorConfig, FederationSpec, PrivacySpec, ScenarioConfig, load_coordinator, load_scenario
from fedseek.config.preprocess import PreprocessSpec
from fedseek.wire.data_schema import DataSchema, schema_of
from fedseek.wire.identity import read_site_keys
from fedseek.wire.records import FittedScaling, ModelMeta

ConfigKind = Literal["scenario", "coordinator"]


@dataclass
class Task:
    """What the coordinator knows about the task: shapes, and a held-out test set if it has one."""

    input_shape: tuple[int, ...]
    num_classes: int
    test: Any = None  # fedseek.data.ArrayDataset | None
    name: str = ""
    schema: DataSchema | None = None  # announced to every site; default: the test set's, else shape and class count
    preprocess: PreprocessSpec | None = None  # how the sites turn table rows into features (None: built-in data or unknown)
    columns: list[str] | None = None  # the table columns those features come from (model card, `fedseek predict`)
    builtin: bool = False  # a built-in dataset (its loader scales it)
    task_type: str = "classification"  # or "regression" (num_classes is then 1: the model's one output)
    target_scale: tuple[float, float] | None = None  # regression: (mean, std) the target is standardised with
    label_column: str | None = None  # the tables' label column (the regression target's name in scaling statistics)

    def __post_init__(self) -> None:
        """Derive the announced data schema from the test set (names where it has them) or the shapes."""
        if self.schema is None:
            self.schema = self.test.schema() if self.test is not None else schema_of(self.input_shape, self.num_classes, None, None,
                                                                                     task=self.task_type)


@dataclass
class RunPlan:
    """A run as the coordinator starts it: the federation config, its task and where outputs go."""

    cfg: FederationSpec
    task: Task
    out_dir: Path
    expected_sites: int
    node_wait_s: float
    privacy: PrivacySpec | None
    run_id: str
    resume: bool = False
    site_keys: dict[str, bytes] | None = None  # registered sites' keys (deployment): a node's site is the one its key names


def model_meta(fed: FederationSpec, task: Task) -> ModelMeta:
    """The architecture description sent to sites and saved as model.json."""
    return ModelMeta(kind=fed.model.kind, hidden=list(fed.model.hidden), width=fed.model.width, input_shape=list(task.input_shape),
                     num_classes=task.num_classes,
                     task=task.task_type)


def scenario_task(cfg: ScenarioConfig) -> Task:
    """A scenario's task: the built-in dataset's held-out split, or the scenario's test table, is the central test set."""
    from fedseek.data.scenario_data import scenario_shapes

    test, shaped = scenario_shapes(cfg)
    if not cfg.data.own_tables:
        return Task(tuple(shaped.input_shape), int(shaped.num_classes), test, cfg.data.source_name, schema=shaped.schema(), builtin=True)
    return Task(tuple(shaped.input_shape), int(shaped.num_classes), test, cfg.data.source_name, schema=shaped.schema(),
                preprocess=cfg.data.preprocess, columns=shaped.columns, task_type=shaped.task, target_scale=shaped.target_scale,
                label_column=cfg.data.label_column)


def coordinator_task(cfg: CoordinatorConfig) -> Task:
    """A deployed coordinator's task: built-in test split, a test table, or shapes only."""
    t = cfg.task
    if t.dataset:
        from fedseek.data import load_builtin

        _, test = load_builtin(t.dataset, cfg.seed, test_fraction=t.test_fraction, **t.options)
        return Task(tuple(test.input_shape), int(test.num_classes), test, t.dataset, builtin=True)
    if t.test_file:
        from fedseek.data import load_table

        test = load_table(t.test_file, str(t.label_column), t.feature_columns, standardize=t.standardize, classes=t.classes,
                          preprocessing=t.preprocessing, task=t.task)
        spec = t.preprocessing or PreprocessSpec(scaling="local" if t.standardize else "none")
        return Task(tuple(test.input_shape), int(test.num_classes), test, Path(t.test_file).stem, preprocess=spec, columns=test.columns,
                    task_type=t.task, target_scale=test.target_scale, label_column=t.label_column)
    outputs = 1 if t.task == "regression" else t.num_classes
    if t.input_shape is None or outputs is None:
        raise ValueError("coordinator task needs dataset, test_file, or input_shape and num_classes")
    shape = tuple(int(d) for d in t.input_shape)
    return Task(shape, int(outputs), None, cfg.name, schema_of(shape, int(outputs), t.feature_columns, t.classes, task=t.task),
                preprocess=t.preprocessing, columns=t.feature_columns, task_type=t.task, label_column=t.label_column)


def apply_fitted(task: Task, fitted: FittedScaling) -> None:
    """Scale the central test set by the federation's fitted statistics (once, after the sites computed them)."""
    if task.task_type == "regression" and task.label_column in fitted.mean:
        task.target_scale = (fitted.mean[str(task.label_column)], fitted.std[str(task.label_column)])
    if task.test is None:
        return
    from dataclasses import replace

    from fedseek.data.preprocess import apply_scaling

    test = task.test
    x = apply_scaling(test.x.reshape(len(test.x), -1), list(test.features or []), fitted.mean, fitted.std).reshape(test.x.shape)
    y = test.y
    if task.target_scale is not None:
        y = (test.y.astype("float64") - task.target_scale[0]) / task.target_scale[1]
    task.test = replace(test, x=x, y=y, target_scale=task.target_scale)


def plan_from_context(context: Context) -> RunPlan:
    """Read Flower's run config and load the YAML it names; ValueError with the key when it is unusable."""
    rc = context.run_config
    path = str(rc.get("config-path", ""))
    if not path:
        raise ValueError("run config 'config-path' is empty: start runs with `fedseek simulate` or `fedseek run`")
    kind, out_dir = str(rc.get("config-kind", "scenario")), Path(str(rc.get("out-dir", "runs/latest")))
    resume, run_id = bool(rc.get("resume", False)), str(context.run_id)
    if kind == "scenario":
        cfg = load_scenario(path)
        return RunPlan(cfg, scenario_task(cfg), out_dir, cfg.num_sites, cfg.simulation.node_wait_s, cfg.privacy, run_id, resume)
    if kind == "coordinator":
        ccfg = load_coordinator(path)
        keys = read_site_keys((s.name, s.public_key) for s in ccfg.sites) if ccfg.sites else None  # KeyFileError names the site
        return RunPlan(ccfg, coordinator_task(ccfg), out_dir, int(ccfg.expected_sites or ccfg.strategy.min_sites), ccfg.node_wait_s,
                       ccfg.privacy, run_id, resume, site_keys=keys)
    raise ValueError(f"config-kind {kind!r} not supported (allowed: scenario, coordinator)")
