"""`ckd-ray models ...`: build model folders from public checkpoints."""

from __future__ import annotations

import sys

import click


@click.group()
def models() -> None:
    """Model folders: compose a LLaVA model from an LLM and a vision tower."""


@models.command("compose")
@click.option("--llm", required=True, metavar="DIR_OR_S3", help="Causal-LM folder (Qwen2/Qwen2.5; local or s3://).")
@click.option("--vision", required=True, metavar="DIR_OR_S3",
              help="SigLIP or CLIP folder, vision-only or a full image-text model (local or s3://).")
@click.option("--out", required=True, metavar="DIR_OR_S3", help="New Llava folder (local or s3://); must not exist or be empty.")
@click.option("--connector", type=click.Choice(["mlp2x_gelu"]), default="mlp2x_gelu", show_default=True,
              help="Connector: TinyLLaVA's 2-layer MLP with GELU, freshly initialised.")
@click.option("--vision-feature-layer", type=int, default=-2, show_default=True,
              help="Vision tower layer that feeds the connector (-2: second to last, as LLaVA-1.5 and TinyLLaVA).")
@click.option("--select-strategy", type=click.Choice(["default", "full"]), default=None,
              help="default drops the first visual token (CLIP's class token), full keeps all; "
                   "unset: default for CLIP, full for SigLIP.")
def compose(llm, vision, out, connector, vision_feature_layer, select_strategy) -> None:
    """Compose a Hugging Face Llava folder from --llm and --vision with a fresh connector; it
    loads with transformers alone (AutoProcessor, LlavaForConditionalGeneration). Train the
    connector (PT) before use: as a cascade role, cascade.prepare_teachers does."""
    from ckd_ray.models.compose import ComposeError, ComposeSpec, compose_model

    spec = ComposeSpec(llm=llm, vision=vision, out=out, connector=connector,
                       vision_feature_layer=vision_feature_layer, select_strategy=select_strategy)
    try:
        composed = compose_model(spec)
    except (ComposeError, FileNotFoundError) as err:
        click.echo(str(err), err=True)
        sys.exit(2)
    click.echo(composed.summary())
