"""LoRA, MoELoRA, HydraLoRA and TeamLoRA adapters for any torch model (torch + safetensors only).

    model = apply_adapters(model, AdapterConfig(method="teamlora", r=64, num_experts=4))
    with routing_context(token_groups=groups, token_mask=attention_mask.bool()):
        loss = model(**batch).loss + collect_aux_loss(model)
    with generation_routing(model, prompt_groups, prompt_mask.bool(), new_token_groups=1):  # see routing.py
        new_ids = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask)
    save_adapter(model, "out/")
"""

from .config import AdapterConfig
from .inject import adapter_config, adapter_layers, apply_adapters, collect_aux_loss, find_targets, record_routing
from .lora import AdapterLayer, LoRALinear
from .masking import masked_experts
from .routed import HydraLoRALinear, MoELoRALinear, RoutedAdapterLayer, balance_loss
from .routing import (RoutingInputs, RoutingRecord, checkpoint_context_fn, current_routing, generation_routing,
                      routing_context)
from .state import (ParameterReport, adapter_state_dict, load_adapter, merge_adapters, save_adapter,
                    trainable_parameter_report)
from .teamlora import TeamLoRALinear

__all__ = [
    "AdapterConfig", "apply_adapters", "find_targets", "adapter_layers", "adapter_config",
    "save_adapter", "load_adapter", "adapter_state_dict", "merge_adapters",
    "trainable_parameter_report", "ParameterReport", "routing_context", "current_routing",
    "checkpoint_context_fn", "generation_routing", "RoutingInputs", "RoutingRecord", "collect_aux_loss", "record_routing",
    "balance_loss", "AdapterLayer", "LoRALinear", "MoELoRALinear", "HydraLoRALinear",
    "TeamLoRALinear", "RoutedAdapterLayer", "masked_experts",
]
