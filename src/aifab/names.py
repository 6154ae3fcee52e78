"""The names both sides check, each spelled once: a name is valid where ``fullmatch`` says so.

Every rule here is an allow-list; the messages that go with them are in ``describe``.
"""

from __future__ import annotations

import re

# A session service, a fine-tune run, a profile slug: what a URL path and a folder can hold.
SERVICE_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?")
SERVICE_NAME_RULE = "lowercase letters, digits and '-', at most 40, e.g. 'llama'"
# The same pattern, for a URL route (no anchors: tornado adds its own).
SERVICE_NAME_ROUTE = r"[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?"

# Slurm's names of partitions, accounts, QoS and reservations. Slurm itself allows more, but
# these also go into job environments and #SBATCH lines: letters, digits, '.', '_', '+', '-'.
SLURM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
SLURM_NAME_RULE = "a Slurm name (letters, digits and . _ + -, at most 128)"
SLURM_JOB_ID = re.compile(r"[0-9]{1,12}(?:_[0-9]{1,9})?")
HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# A Hugging Face model id: org/name.
HF_MODEL_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_service_name(name) -> str:
    """``name`` if it is a valid service name; ValueError with the rule otherwise."""
    if not isinstance(name, str) or not SERVICE_NAME.fullmatch(name):
        raise ValueError(f"name {name!r}: {SERVICE_NAME_RULE}")
    return name

# A JupyterHub group name as aifab accepts it (the hub allows more; these also travel in
# JSON, logs and the gateway's registry).
HUB_GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
HUB_GROUP_RULE = "a hub group name (letters, digits and . _ @ + -, at most 64)"
