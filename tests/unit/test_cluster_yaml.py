"""Offline checks for the AWS cluster launcher config (cluster.yaml).

No cluster is started and no cloud API is called. Validation uses Ray's own
cluster-config machinery: ``prepare_config`` (merges the AWS defaults exactly as
``ray up`` does before bootstrapping) followed by ``validate_config`` (JSON
schema ``ray/autoscaler/ray-schema.json`` plus Ray's extra consistency checks).
"""

from __future__ import annotations

import copy
import ipaddress
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO_ROOT / "cluster.yaml"

# Ray dashboard / Jobs API, Ray client server, GCS, Serve HTTP proxy.
RAY_PORTS = (8265, 10001, 6379, 8000)
A100_INSTANCE_TYPES = {"p4d.24xlarge", "p4de.24xlarge"}
WORLD_V4 = ipaddress.ip_network("0.0.0.0/0")
WORLD_V6 = ipaddress.ip_network("::/0")


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    with CLUSTER_YAML.open() as f:
        config = yaml.safe_load(f)
    assert isinstance(config, dict)
    return config


@pytest.fixture()
def config(raw: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(raw)


def _ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does offline: fill defaults, then schema-validate."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _gpu_worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = config["head_node_type"]
    return {
        name: node
        for name, node in config["available_node_types"].items()
        if name != head and node.get("resources", {}).get("GPU", 0) > 0
    }


def _rule_ports(rule: dict[str, Any]) -> range | None:
    """Port range a rule opens; None means all ports (protocol -1 / missing)."""
    if str(rule.get("IpProtocol", "-1")) in ("-1", "all"):
        return None
    lo, hi = rule.get("FromPort", -1), rule.get("ToPort", -1)
    if lo == -1 or hi == -1:
        return None
    return range(int(lo), int(hi) + 1)


def _rule_cidrs(rule: dict[str, Any]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])]
    cidrs += [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


def _is_world(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    return net in (WORLD_V4, WORLD_V6)


def _external_rules(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rules reachable from outside the cluster: CIDR ranges or prefix lists."""
    return [r for r in rules if r.get("IpRanges") or r.get("Ipv6Ranges") or r.get("PrefixListIds")]


# ------------------------------------------------------------ schema ------


def test_validates_against_ray_schema(config: dict[str, Any]) -> None:
    validate_config(copy.deepcopy(config))  # as written
    prepared = _ray_validate(config)  # as `ray up` sees it
    assert prepared["cluster_name"] == "ctray"
    assert prepared["provider"]["type"] == "aws"
    assert prepared["provider"]["region"] == "us-east-1"


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda c: c.update(not_a_ray_key=True), id="unknown-top-level-key"),
        pytest.param(lambda c: c.update(max_workers="two"), id="max_workers-wrong-type"),
        pytest.param(
            lambda c: c["available_node_types"]["ray.worker.a100"]["resources"].update(GPU="8"),
            id="gpu-count-as-string",
        ),
        pytest.param(
            lambda c: c["provider"]["security_group"].update(Typo=1),
            id="unknown-security_group-key",
        ),
        pytest.param(lambda c: c.update(head_start_ray_commands="ray start"), id="cmds-not-list"),
    ],
)
def test_broken_copy_fails_ray_schema(config: dict[str, Any], breakage) -> None:
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        _ray_validate(config)


def test_head_node_type_must_exist(config: dict[str, Any]) -> None:
    config["head_node_type"] = "ray.head.missing"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(config)


# ------------------------------------------------------------- nodes ------


def test_gpu_worker_is_a100_with_gpu_resources(config: dict[str, Any]) -> None:
    workers = _gpu_worker_types(config)
    assert workers, "no worker node type declares GPU resources"
    for name, node in workers.items():
        assert node["node_config"]["InstanceType"] in A100_INSTANCE_TYPES, name
        # p4d/p4de carry 8 A100s; the declared count must match the hardware.
        assert node["resources"]["GPU"] == 8, name
        assert node["min_workers"] == 0, "GPU nodes must scale to zero when idle"
        assert node["node_config"]["ImageId"].startswith("ami-")


def test_worker_bounds(config: dict[str, Any]) -> None:
    prepared = _ray_validate(config)
    assert prepared["max_workers"] >= 1
    for name, node in prepared["available_node_types"].items():
        assert node["max_workers"] >= node.get("min_workers", 0), name
    assert (
        sum(n.get("min_workers", 0) for n in prepared["available_node_types"].values())
        <= (prepared["max_workers"])
    )
    assert prepared["idle_timeout_minutes"] > 0


def test_head_is_cpu_only(config: dict[str, Any]) -> None:
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert not head["node_config"]["InstanceType"].startswith(("p", "g"))


# ---------------------------------------------------------- security ------


def _check_configured_rules(rules: list[dict[str, Any]]) -> None:
    assert rules, "expected an explicit ingress rule list"
    for rule in _external_rules(rules):
        ports = _rule_ports(rule)
        # The only thing reachable from outside the security group is SSH.
        assert ports == range(22, 23), rule
        assert not rule.get("PrefixListIds"), rule
        for net in _rule_cidrs(rule):
            assert not _is_world(net), f"SSH must be limited to an admin CIDR: {rule}"
            assert net.prefixlen >= 8, f"admin CIDR too broad: {rule}"


def test_no_public_ray_ports_in_configured_rules(config: dict[str, Any]) -> None:
    _check_configured_rules(config["provider"]["security_group"]["IpPermissions"])


_AWS_SDK_MODULES = (
    "boto3",
    "boto3.exceptions",
    "boto3.resources",
    "boto3.resources.base",
    "botocore",
    "botocore.client",
    "botocore.config",
    "botocore.exceptions",
)


@pytest.fixture()
def ray_aws_config() -> Iterator[Any]:
    """Ray's AWS bootstrap module, importable without the AWS SDK.

    Only the cloud SDK (boto3/botocore) is stubbed, and only if it is not
    installed; nothing is called on it. Modules imported here are removed
    afterwards so other tests never see the stubs.
    """
    before = set(sys.modules)
    stubbed: list[str] = []
    try:
        import boto3  # noqa: F401
    except ImportError:
        for name in _AWS_SDK_MODULES:
            sys.modules[name] = mock.MagicMock(name=name)
            stubbed.append(name)
        sys.modules["boto3"].__version__ = "99.0.0"  # Ray asserts a minimum version
    try:
        from ray.autoscaler._private.aws import config as aws_config

        yield aws_config
    finally:
        if stubbed:
            for name in set(sys.modules) - before:
                if name in stubbed or name.startswith("ray.autoscaler._private.aws"):
                    del sys.modules[name]


def test_effective_rules_never_expose_ray_ports(config: dict[str, Any], ray_aws_config) -> None:
    """Merge our rules with Ray's hard-coded defaults the way `ray up` does.

    `_create_default_inbound_rules` is a pure function (no AWS call); it adds an
    intra-group all-traffic rule and SSH from anywhere, then our rules.
    """
    _create_default_inbound_rules = ray_aws_config._create_default_inbound_rules
    extra = config["provider"]["security_group"]["IpPermissions"]
    effective = _create_default_inbound_rules({"sg-0123456789abcdef0"}, extra)
    for rule in effective:
        if rule not in _external_rules(effective):
            # Intra-cluster rule: sources are only security groups.
            assert set(rule) <= {"FromPort", "ToPort", "IpProtocol", "UserIdGroupPairs"}
            continue
        ports = _rule_ports(rule)
        assert ports is not None, f"all-ports rule reachable from outside: {rule}"
        for port in RAY_PORTS:
            assert port not in ports, f"port {port} reachable from outside: {rule}"
        assert ports == range(22, 23), rule


@pytest.mark.parametrize("port", RAY_PORTS)
def test_rule_checker_catches_public_ports(config: dict[str, Any], port: int) -> None:
    """Guard against a vacuous check: a world-open Ray port must be flagged."""
    config["provider"]["security_group"]["IpPermissions"].append(
        {
            "IpProtocol": "tcp",
            "FromPort": port - 1,
            "ToPort": port + 1,
            "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
        }
    )
    _ray_validate(config)  # still schema-valid ...
    with pytest.raises(AssertionError):  # ... but rejected by the policy check
        _check_configured_rules(config["provider"]["security_group"]["IpPermissions"])


def test_no_preexisting_security_group_bypass(config: dict[str, Any]) -> None:
    # A SecurityGroupIds entry would silently replace the declared rules.
    for name, node in config["available_node_types"].items():
        assert "SecurityGroupIds" not in node["node_config"], name


def test_dashboard_bound_to_localhost(config: dict[str, Any]) -> None:
    head_cmds = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head_cmds
    assert "--port=6379" in head_cmds
    assert "--dashboard-host=127.0.0.1" in head_cmds
    assert "0.0.0.0" not in head_cmds
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_cmds
    assert config["head_start_ray_commands"][0] == "ray stop"

    worker_cmds = " ".join(config["worker_start_ray_commands"])
    assert config["worker_start_ray_commands"][0] == "ray stop"
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker_cmds


def test_token_auth_enforced(config: dict[str, Any]) -> None:
    everything = yaml.safe_dump(config)
    assert "RAY_AUTH_MODE=disabled" not in everything
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in " ".join(config[key]), key
    # Every node receives the shared token file.
    assert "/home/ubuntu/.ray/auth_token" in config["file_mounts"]


# ------------------------------------------------------------- setup ------


def test_setup_installs_project(config: dict[str, Any]) -> None:
    assert config["file_mounts"].get("/home/ubuntu/ctray") == "."
    setup = config["setup_commands"]
    assert "pip install /home/ubuntu/ctray" in setup
    # The project must be mounted before it is installed: file_mounts always
    # run first, so only check the mount source is the repo root.
    assert (REPO_ROOT / "pyproject.toml").is_file()
    assert ".venv" in config["rsync_exclude"], "do not upload the local venv"


def test_cluster_ray_version_matches_client(config: dict[str, Any]) -> None:
    pins = [c for c in config["setup_commands"] if "pip install" in c and "ray[" in c]
    assert pins, "Ray must be pinned on the cluster"
    assert all(f"=={ray.__version__}" in c for c in pins), (pins, ray.__version__)
