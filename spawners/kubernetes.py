"""The ``kubernetes`` backend: kubespawner's KubeSpawner, configured from the placement.

kubespawner's own profile_list is not used: the child gets plain traits derived from the
validated placement and the admin's profile, so the same allow-list applies to every backend.
"""

from __future__ import annotations

from kubespawner import KubeSpawner

from .options import Placement
from .profiles import Profile


class KubeSessionSpawner(KubeSpawner):
    """KubeSpawner, unchanged but for its name (so sites can configure it separately)."""


def kube_traits(placement: Placement, profile: Profile | None) -> dict:
    """The KubeSpawner traits for a placement. Pure, so manifests are testable offline."""
    traits: dict = {
        "cpu_limit": float(placement.cpus),
        "cpu_guarantee": float(placement.cpus),
        "mem_limit": f"{placement.memory_gb}G",
        "mem_guarantee": f"{placement.memory_gb}G",
        "allow_privilege_escalation": False,
        # the pod ends at the walltime like a Slurm job would
        "extra_pod_config": {"activeDeadlineSeconds": int(placement.walltime_s)},
        "container_security_context": {
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if placement.image_ref:
        traits["image"] = placement.image_ref
    if profile is None:
        return traits
    k = profile.kubernetes
    if placement.gpus:
        traits["extra_resource_limits"] = {k.gpu_resource: str(placement.gpus)}
        traits["extra_resource_guarantees"] = {k.gpu_resource: str(placement.gpus)}
    if k.node_selector:
        traits["node_selector"] = dict(k.node_selector)
    if k.tolerations:
        traits["tolerations"] = [dict(t) for t in k.tolerations]
    if k.namespace:
        traits["namespace"] = k.namespace
    if k.service_account:
        traits["service_account"] = k.service_account
    if k.storage_capacity:
        traits["storage_pvc_ensure"] = True
        traits["storage_capacity"] = k.storage_capacity
        if k.storage_class:
            traits["storage_class"] = k.storage_class
        traits["volumes"] = [{"name": "home",
                              "persistentVolumeClaim": {"claimName": "{pvc_name}"}}]
        traits["volume_mounts"] = [{"name": "home", "mountPath": "/home/jovyan"}]
    return traits


def configure_kube_child(child: KubeSpawner, placement: Placement, profile) -> None:
    for name, value in kube_traits(placement, profile).items():
        setattr(child, name, value)
