"""ckd_ray: cascaded knowledge distillation of vision-language models on Ray."""

__version__ = "0.1.0"
