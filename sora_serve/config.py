"""`AdapterConfig`: the hyper-parameters of one adapter, shared by training, saving and serving."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .errors import AdapterError

ROTATIONS = ("first_order", "cayley")
FORMAT_VERSION = 1


@dataclass
class AdapterConfig:
    """What an adapter is: its method, its ranks and where it attaches.

    method: a name in `sora_serve.methods.METHOD_CLASSES` (lora | dora | prediag | sora).
    r, lora_alpha: rank of the input-side LoRA term; its scale is s = lora_alpha / r.
    r_p, s0, rotation: SORA's rotation rank, the numerator of s_p and the rotation mode.
    target_modules: module-name suffixes to adapt (PEFT's convention), or "all-linear".
    """

    method: str = "sora"
    r: int = 8
    lora_alpha: float = 16.0
    r_p: int = 4
    s0: float = 1.0
    rotation: str = "cayley"
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_dropout: float = 0.0
    use_rslora: bool = False  # PEFT's rsLoRA scale s = lora_alpha / sqrt(r); only from PEFT dirs

    def __post_init__(self) -> None:
        from .methods import METHOD_CLASSES  # the registry imports this module: read it at call time

        if self.method not in METHOD_CLASSES:
            raise AdapterError(
                f"unknown method {self.method!r}; expected one of {tuple(METHOD_CLASSES)}", field="method"
            )
        if self.rotation not in ROTATIONS:
            raise AdapterError(f"unknown rotation {self.rotation!r}; expected one of {ROTATIONS}", field="rotation")
        for name in ("r", "r_p"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise AdapterError(f"must be a positive integer, got {value!r}", field=name)
        for name in ("lora_alpha", "s0"):
            value = getattr(self, name)
            if not _is_real(value) or not value > 0:
                raise AdapterError(f"must be a positive finite number, got {value!r}", field=name)
        if not _is_real(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            raise AdapterError(f"must be a number in [0, 1), got {self.lora_dropout!r}", field="lora_dropout")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            self.target_modules = [self.target_modules]
        if not self.target_modules:
            raise AdapterError("must name at least one module", field="target_modules")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (self.r**0.5 if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        return asdict(self)


def _is_real(value: object) -> bool:
    """A finite int or float (not a bool, not a string such as "16")."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
