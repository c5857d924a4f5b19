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
    """Validate CONFIG_PATHS (merged in order) and report every problem at once."""
    from ckd_ray.cascade.plan import build_plan

    cfg = load_or_exit(config_paths, overrides)
    stages: dict[str, list[str]] = {}
    for planned in build_plan(cfg):  # teacher preparation included
        stages.setdefault(planned.stage.label, []).append(planned.kind)
    plan = f"plan {cfg.cascade.plan}" if cfg.cascade.plan else "stages"
    listed = ", ".join(f"{label}[{','.join(kinds)}]" for label, kinds in stages.items()) or "none"
    click.echo(f"OK: job {cfg.name!r}, roles {sorted(cfg.models)}, {plan}: {listed}")


@config.command("show")
@config_options
def show(config_paths, overrides) -> None:
    """Print the fully resolved config (defaults filled in) as YAML."""
    cfg = load_or_exit(config_paths, overrides)
    click.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
