"""sora-serve: exact training, folding, export and serving of LoRA, DoRA, Pre-Diag and SORA adapters.

Data flows one way: training/ writes an adapter directory; converters/ (fold, to-LoRA, ONNX)
and the serving integrations read it. The math of each method is in `sora_serve.methods`.
"""

from .adapter_format import AdapterFile, read_adapter
from .config import AdapterConfig
from .errors import AdapterError
from .fingerprint import BaseLayer
from .io import load_adapter, save_adapter
from .methods import ServingFactors
from .model import (
    adapted_layers,
    adapter_configs,
    adapters_disabled,
    attach,
    count_parameters,
    delete_adapter,
    set_active_adapter,
    use_adapters,
)
from .validation import check_against_base

__all__ = [
    "AdapterConfig",
    "AdapterError",
    "AdapterFile",
    "BaseLayer",
    "ServingFactors",
    "adapted_layers",
    "adapter_configs",
    "adapters_disabled",
    "attach",
    "check_against_base",
    "count_parameters",
    "delete_adapter",
    "load_adapter",
    "read_adapter",
    "save_adapter",
    "set_active_adapter",
    "use_adapters",
]
