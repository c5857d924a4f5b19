"""Entry point of `ray job submit`: runs a cascade job on the cluster the job was submitted to.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/cascade_job.py configs/tiny_cascade.yaml

Inside a submitted job RAY_ADDRESS points at the cluster, so the runner joins it instead of
starting a local Ray. Arguments are those of `ckd-ray cascade`.
"""

import sys

from ckd_ray.cli import main

if __name__ == "__main__":
    main(["cascade", *sys.argv[1:]], prog_name="cascade_job")
