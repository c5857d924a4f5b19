"""Entry point of `ray job submit` for a Ray Tune search (arguments of `ckd-ray tune`)."""

import sys

from ckd_ray.cli import main

if __name__ == "__main__":
    main(["tune", *sys.argv[1:]], prog_name="tune_job")
