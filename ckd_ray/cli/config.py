"""`ckd-ray config`: validate and show job configs without starting anything."""

from __future__ import annotations

import click
import yaml

from ckd_ray.cli.options import config_options, load_or_exit


@click.group()
def config() -> None:
    """Validate and inspect job configs."""


@config.command("check")
@config_options
def check(config_paths, overrides) -> None:
    """Validate CONFIG_PATHS (merged in order) and report every problem at once. An experiment
    (`kind: experiment`, one path) is checked as `ckd-ray experiment` reads it: every row a valid job;
    a job with a `tune.space` as `ckd-ray tune` checks it."""
    from ckd_ray.cascade.plan import build_plan

    if len(config_paths) == 1 and _is_experiment(config_paths[0]):
        return _check_experiment(config_paths[0], overrides)
    cfg = load_or_exit(config_paths, overrides)
    if cfg.tune.space:  # a search is checked as `ckd-ray tune` checks it before Ray starts
        import sys

        from ckd_ray.config import ConfigError
        from ckd_ray.tune.checks import check_tune

        problems = check_tune(cfg)
        if problems:
            click.echo(str(ConfigError(problems, "tune")), err=True)
            sys.exit(2)
    stages: dict[str, list[str]] = {}
    for planned in build_plan(cfg):  # teacher preparation included
        stages.setdefault(planned.stage.label, []).append(planned.kind)
    plan = f"plan {cfg.cascade.plan}" if cfg.cascade.plan else "stages"
    listed = ", ".join(f"{label}[{','.join(kinds)}]" for label, kinds in stages.items()) or "none"
    click.echo(f"OK: job {cfg.name!r}, roles {sorted(cfg.models)}, {plan}: {listed}")


def _is_experiment(path: str) -> bool:
    try:
        raw = yaml.safe_load(open(path))
    except (OSError, yaml.YAMLError):
        return False  # load_or_exit names what is wrong with it
    return isinstance(raw, dict) and raw.get("kind") == "experiment"


def _check_experiment(path: str, overrides) -> None:
    import sys

    from ckd_ray.cascade.experiment import load_experiment
    from ckd_ray.config import ConfigError

    try:
        spec, _ = load_experiment(path, list(overrides))
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)
    rows = ", ".join(f"{run.name}[{run.plan}]" for run in spec.runs)
    click.echo(f"OK: experiment {spec.name!r}, seeds {spec.seeds}, rows {rows}")


@config.command("show")
@config_options
def show(config_paths, overrides) -> None:
    """Print the fully resolved config (defaults filled in) as YAML."""
    cfg = load_or_exit(config_paths, overrides)
    click.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
