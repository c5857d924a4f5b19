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
    cfg = load_or_exit(config_paths, overrides)
    stages = ", ".join(s.label + "[" + ",".join(st.kind for st in s.steps) + "]" for s in cfg.cascade.stages) or "none"
    click.echo(f"OK: job {cfg.name!r}, roles {sorted(cfg.models)}, stages: {stages}")


@config.command("show")
@config_options
def show(config_paths, overrides) -> None:
    """Print the fully resolved config (defaults filled in) as YAML."""
    cfg = load_or_exit(config_paths, overrides)
    click.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
