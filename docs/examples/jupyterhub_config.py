"""JupyterHub configuration for an Alps-like site (GH200 Slurm partition + Kubernetes).

The hub runs as root on a login/service node that can submit to Slurm; sessions on Slurm run
as each user's own account (sudo -E -u USER sbatch ...), those on Kubernetes as pods.
Copy it, set the paths, and point the profiles at your partitions.
"""

import os
from pathlib import Path

from aifab.spawners import use_placement_spawner

c = get_config()  # noqa: F821 - provided by JupyterHub

PROFILES = os.environ.get("AIFAB_PROFILES", str(Path(__file__).with_name("alps-profiles.yaml")))
# Checked now: a mistake in the profiles stops the hub with the profile and field named.
use_placement_spawner(c, profiles_file=PROFILES)

# Sessions on Slurm keep running while the hub restarts; the hub re-adopts them.
c.JupyterHub.cleanup_servers = False
c.Spawner.default_url = "/lab"

# The single-user server inside the job (the site's environment on the compute node).
c.SlurmSessionSpawner.cmd = ["jupyterhub-singleuser"]
c.SlurmSessionSpawner.batchspawner_singleuser_cmd = "aifab-singleuser"
# A queue wait counts against start_timeout: give the scheduler time.
c.SlurmSessionSpawner.start_timeout = 600
