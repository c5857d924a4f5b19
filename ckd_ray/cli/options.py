"""Options shared by the commands that take a job config."""

from __future__ import annotations

import sys

import click

from ckd_ray.config import ConfigError, JobConfig, load_config


PATHS_FROM = "ckd_ray_paths_from"


def _remember_paths_from(ctx: click.Context, _param, value):
    ctx.meta[PATHS_FROM] = value
    return value


def config_options(func):
    func = click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help="Override a config value, e.g. --set trainer.max_steps=20 (repeatable; values are YAML).",
    )(func)
    func = click.option(
        "--paths-from", metavar="DIR", expose_value=False, callback=_remember_paths_from,
        type=click.Path(file_okay=False),
        help="Resolve the config's relative paths (data, models, storage) against DIR instead of the current "
             "directory, e.g. --paths-from $PWD in a `ray job submit` entrypoint, which runs in Ray's upload of "
             "the working directory (without data/, models/ or runs/).",
    )(func)
    return click.argument("config_paths", nargs=-1, required=True, type=click.Path(dir_okay=False))(func)


def load_or_exit(config_paths, overrides, *, check_storage: bool = False) -> JobConfig:
    """The validated config, or every problem printed and exit code 2, before any Ray work.
    `check_storage` (commands that run the job): also what the job reads must exist and its S3
    buckets must answer with the environment's credentials. The command's `--paths-from`, if
    given, is the directory relative paths resolve against."""
    from ckd_ray.config.checks import check_storage as storage_problems

    context = click.get_current_context(silent=True)
    base = context.meta.get(PATHS_FROM) if context is not None else None
    try:
        job = load_config(list(config_paths), list(overrides), base=base)
        if check_storage and (problems := storage_problems(job)):
            raise ConfigError(problems, f"the data and storage of {', '.join(config_paths)}")
        return job
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(2)


def verbose_option(func):
    return click.option(
        "--verbose", "-v", is_flag=True,
        help="Show everything Ray, DeepSpeed and transformers print on the console (by default it goes to the run's log file).",
    )(func)
