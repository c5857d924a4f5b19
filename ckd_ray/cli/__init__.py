"""The `ckd-ray` command line: thin commands that parse, build, run and clean up."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckd_ray")
def main() -> None:
    """Cascaded knowledge distillation of vision-language models on Ray."""


def _register() -> None:
    from ckd_ray.cli import cascade as cascade_cli
    from ckd_ray.cli import config as config_cli
    from ckd_ray.cli import data as data_cli
    from ckd_ray.cli import models as models_cli
    from ckd_ray.cli import tune as tune_cli

    main.add_command(config_cli.config)
    main.add_command(data_cli.data)
    main.add_command(models_cli.models)
    main.add_command(cascade_cli.cascade)
    main.add_command(cascade_cli.evaluate)
    main.add_command(tune_cli.tune)
    main.add_command(cascade_cli.experiment)


_register()
