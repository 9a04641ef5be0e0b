"""The 'lsms' block of a plans configuration: the LSMSConfig fields the planner decided, as JSON.

Written by the planners, read by the trainer, so it depends on nothing heavier than the network config and nnU-Net's
PlansManager (which resolves 'inherits_from' exactly as training and inference will).
"""
from __future__ import annotations

from typing import Mapping

from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from lsms_nnunet.network import LSMSConfig, LSMSNet, build_lsms_network

LSMS_OUTPUT_CLASSES = 2  # LSMS always predicts background vs. the referred target, whatever dataset.json lists
PLANNED_LSMS_SETTINGS = ("text_dim", "max_tokens", "svla_stages", "fsd_channels_per_scale", "attention_dim")


def planned_lsms_settings(config: LSMSConfig, n_stages: int) -> dict:
    """The LSMSConfig fields the planner decides for an encoder of n_stages, as stored in a configuration's 'lsms'."""
    settings = {name: config.to_dict()[name] for name in PLANNED_LSMS_SETTINGS}
    settings["svla_stages"] = list(config.svla_stage_indices(n_stages))
    return settings


def resolved_configuration(plans: Mapping, configuration: str) -> dict:
    """A configuration with what it inherits ('inherits_from') filled in, by nnU-Net's PlansManager."""
    configurations = plans["configurations"]
    if configuration not in configurations:
        raise ValueError(f"Configuration {configuration!r} is not in plans {plans.get('plans_name')!r} (available: "
                         f"{sorted(configurations)}); pick one of those or re-run LSMSv2_plan_experiment.")
    try:
        resolved = PlansManager(dict(plans)).get_configuration(configuration).configuration
    except (ValueError, RuntimeError) as error:  # a missing or circular parent
        raise ValueError(f"Plans {plans.get('plans_name')!r}: configuration {configuration!r} cannot be resolved: "
                         f"{error} Fix 'inherits_from' or re-plan.") from error
    resolved.pop("inherits_from", None)
    return resolved


def lsms_settings_from_plans(plans: Mapping, configuration: str) -> dict:
    """LSMSConfig overrides stored in a configuration's 'lsms' block ({} for plans without one, e.g. nnUNetPlans).

    Inherited configurations (3d_cascade_fullres) resolve as nnU-Net resolves them. Values are validated and
    returned LSMSConfig-ready (tuples, not JSON lists).
    """
    block = resolved_configuration(plans, configuration).get("lsms", {})
    try:
        config = LSMSConfig.from_dict(block)
    except ValueError as error:
        raise ValueError(f"Plans {plans.get('plans_name')!r}, configuration {configuration!r}: invalid 'lsms' "
                         f"block {block}: {error}") from error
    return {name: getattr(config, name) for name in block}


def build_planned_lsms_network(architecture: Mapping, num_input_channels: int, settings: Mapping,
                               deep_supervision: bool = True) -> LSMSNet:
    """The LSMS network a configuration describes: its 'architecture' block plus its 'lsms' settings."""
    return build_lsms_network(architecture["network_class_name"], architecture["arch_kwargs"],
                              architecture["_kw_requires_import"], num_input_channels, LSMS_OUTPUT_CLASSES,
                              deep_supervision, LSMSConfig.from_dict(settings))
