"""Executors: the compact fape-s U-Net, the Frequency-Aware LoRA-MoE, plan tokens and tiling."""

from __future__ import annotations

from fapecli.execution.compact import (
    PRESETS,
    FapeS,
    FapeSConfig,
    count_parameters,
    create_model,
    get_config,
    prepare_input,
)
from fapecli.execution.conditioning import PlanEncoder, plan_for_task, plan_tokens
from fapecli.execution.experts import TaskExperts, load_compact
from fapecli.execution.moe import (
    EXPERTS,
    FrequencyAwareLoRAMoE,
    collect_moe_layers,
    inject_lora_moe,
    moe_regulariser,
    plan_context,
    routing_heatmap,
    routing_maps,
    routing_summary,
    set_plan_tokens,
)
from fapecli.execution.tiling import TiledOutput, restore_tiled

__all__ = [
    "EXPERTS",
    "PRESETS",
    "FapeS",
    "FapeSConfig",
    "FrequencyAwareLoRAMoE",
    "PlanEncoder",
    "TaskExperts",
    "TiledOutput",
    "collect_moe_layers",
    "count_parameters",
    "create_model",
    "get_config",
    "inject_lora_moe",
    "load_compact",
    "moe_regulariser",
    "plan_context",
    "plan_for_task",
    "plan_tokens",
    "prepare_input",
    "restore_tiled",
    "routing_heatmap",
    "routing_maps",
    "routing_summary",
    "set_plan_tokens",
]
