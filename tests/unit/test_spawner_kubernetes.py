"""Kubernetes placement: the pod manifests KubeSpawner's own code builds for each Kubernetes
profile of the site example, validated against the Kubernetes schema. No cluster can run on
these machines; the live test runs where KUBECONFIG points at one."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from unittest import mock

import kubernetes_validate
import pytest
from kubernetes_asyncio.client import ApiClient

from aifab.spawners import load_profiles, load_profiles_file, validate_options
from aifab.spawners.kubernetes import KubeSessionSpawner, configure_kube_child

REPO = Path(__file__).resolve().parents[2]
ALPS = load_profiles(load_profiles_file(REPO / "docs/examples/alps-profiles.yaml"))
K8S_PROFILES = [p for p in ALPS if p.backend == "kubernetes"]
K8S_VERSION = "1.30"


async def build_manifest(profile, options: dict) -> dict:
    placement = validate_options({"profile": profile.slug, **options}, ALPS, "ada", admin=True)
    # Constructing a KubeSpawner loads a kube config and makes an API client: neither exists
    # here, and building a manifest needs neither (reflectors start only in start()).
    with mock.patch("kubespawner.spawner.load_config"), \
            mock.patch("kubespawner.spawner.shared_client"):
        spawner = KubeSessionSpawner(_mock=True)
    configure_kube_child(spawner, placement, profile)
    pod = await spawner.get_pod_manifest()
    async with ApiClient() as api:
        return api.sanitize_for_serialization(pod)


@pytest.mark.parametrize("profile", K8S_PROFILES, ids=lambda p: p.slug)
def test_pod_manifest_is_valid_and_carries_the_placement(profile):
    gpus = profile.choices.gpus.max
    manifest = asyncio.run(build_manifest(profile, {"gpus": gpus, "cpus": 2,
                                                    "memory_gb": 8}))
    assert kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    (container,) = manifest["spec"]["containers"]
    assert container["image"] == next(iter(profile.choices.images.values()))
    limits = container["resources"]["limits"]
    assert float(limits["cpu"]) == 2.0
    assert int(limits["memory"]) == 8 * 2**30  # GiB, as the form says
    if gpus:
        assert limits["nvidia.com/gpu"] == str(gpus)
        assert manifest["spec"]["tolerations"][-1]["key"] == "nvidia.com/gpu"
    else:
        assert "nvidia.com/gpu" not in limits
    assert manifest["spec"]["nodeSelector"] == dict(profile.kubernetes.node_selector)
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["runAsNonRoot"] is True and sc["capabilities"]["drop"] == ["ALL"]
    assert not sc.get("privileged")
    assert manifest["spec"]["activeDeadlineSeconds"] == profile.choices.walltime.default


def test_an_extra_field_would_fail_the_schema():
    manifest = asyncio.run(build_manifest(K8S_PROFILES[0], {}))
    manifest["spec"]["containers"][0]["privilegedd"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


@pytest.mark.k8s_live
def test_live_pod_starts_on_the_cluster():
    """Where KUBECONFIG points at a cluster: the CPU profile's pod is created and runs."""
    from kubernetes_asyncio import client, config

    async def run():
        await config.load_kube_config(os.environ["KUBECONFIG"])
        manifest = await build_manifest(K8S_PROFILES[0], {})
        manifest["metadata"]["name"] = f"aifab-live-test-{int(time.time())}"
        manifest["spec"]["containers"][0]["args"] = ["sleep", "30"]
        ns = K8S_PROFILES[0].kubernetes.namespace or "default"
        async with ApiClient() as api:
            core = client.CoreV1Api(api)
            await core.create_namespaced_pod(ns, manifest)
            try:
                for _ in range(120):
                    pod = await core.read_namespaced_pod(manifest["metadata"]["name"], ns)
                    if pod.status.phase == "Running":
                        return
                    await asyncio.sleep(1)
                raise AssertionError(f"pod not running: {pod.status}")
            finally:
                await core.delete_namespaced_pod(manifest["metadata"]["name"], ns)

    asyncio.run(run())
