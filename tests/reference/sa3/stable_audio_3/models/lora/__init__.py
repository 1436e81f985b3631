from .model import LoRAParametrization, add_lora, default_lora_config, merge_lora, remove_lora, remove_lora_by_index, set_lora_strength
from .utils import (
    apply_to_lora,
    convert_lora_ckpt_to_safetensors,
    disable_lora,
    enable_lora,
    filter_lora_layers,
    get_lora_count,
    has_lora,
    get_bias_params,
    get_lora_params,
    get_lora_layers,
    get_lora_state_dict,
    load_lora_checkpoint,
    load_multiple_lora,
    name_is_lora,
    remap_lora_state_dict,
    save_lora_safetensors,
    select_lora,
    tie_weights,
    untie_weights,
    infer_global_rank,
    cast_base_to_precision,
    detect_dora_variant,
    prepare_dora_state_dict,
    resolve_adapter_type
)
from .loader import load_and_apply_loras