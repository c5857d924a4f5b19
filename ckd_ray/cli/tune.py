"""`ckd-ray tune`."""

from __future__ import annotations

import sys

import click

from ckd_ray.cli.options import config_options, load_or_exit, verbose_option


@click.command()
@config_options
@click.option("--run-best", is_flag=True, help="Then run the full cascade with the best config found.")
@verbose_option
def tune(config_paths, overrides, run_best, verbose) -> None:
    """Search the loss weights and temperature of each stage of CONFIG_PATHS (its `tune:` section)
    with Ray Tune: ASHA early stopping, Optuna or random search, each trial a short student run on
    the cached teacher signal. Writes a results table, plots, tune_report.md and best_config.yaml."""
    from ckd_ray import run_tune
    from ckd_ray.cli.console import console
    from ckd_ray.config import ConfigError
    from ckd_ray.tune.checks import check_tune

    job = load_or_exit(config_paths, overrides, check_storage=True)
    problems = check_tune(job)
    if problems:
        click.echo(str(ConfigError(problems, "tune")), err=True)
        sys.exit(2)
    with console(job, verbose=verbose) as log:
        outcome = run_tune(job, run_best=run_best, log=log, log_to_driver=verbose)
        for stage_index, values in sorted(outcome.best_values.items()):
            log(f"stage {stage_index + 1}: " + ", ".join(f"{name} {value:.4g}" for name, value in values.items()))
        log(f"report: {outcome.report_uri}")
        log(f"best config: {outcome.best_config_uri}")
        if outcome.cascade is not None:
            log(f"cascade report: {outcome.cascade.report_uri}")
