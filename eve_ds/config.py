"""Model configuration and the named presets (eve-tiny, eve-base, eve-large)."""
from eve_ds.errors import UsageError
from dataclasses import asdict, dataclass, fields, replace


class ConfigError(UsageError):
    """A configuration that cannot work; the message names the offending key."""


@dataclass(frozen=True)
class EVEConfig:
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    vocab_size: int = 64000
    max_text_len: int = 40
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    ffn_hidden_size: int = 3072
    # 0-based indices of the layers whose FFN is the modality-aware MoE; the others are multiway.
    moe_layers: tuple = (10, 11)
    num_experts: int = 32
    top_k: int = 2
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    # The learned vision/text routing embedding is added to the MoE input that the experts compute on, not
    # only to the router's input: FFN(LN(x) + e_modality). The authors' released weights were trained so.
    routing_embedding_to_experts: bool = True
    aux_loss_weight: float = 0.001
    drop_path_rate: float = 0.1
    layer_scale_init: float = 0.1
    layer_norm_eps: float = 1e-6
    init_std: float = 0.02
    # How the learned position embeddings start: "sincos" (sine-cosine tables, 2-D for the image as MAE's) or
    # "normal" (init_std, as BEiT's). The authors' pre-training init is not public; see eve_ds/model/init.py.
    position_init: str = "sincos"

    def __post_init__(self):
        object.__setattr__(self, "moe_layers", tuple(self.moe_layers))
        checks = [
            ("hidden_size", self.hidden_size % self.num_heads == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"),
            ("image_size", self.image_size % self.patch_size == 0,
             f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"),
            ("moe_layers", all(0 <= i < self.num_layers for i in self.moe_layers),
             f"moe_layers {self.moe_layers} must lie in [0, num_layers={self.num_layers})"),
            ("top_k", self.top_k in (1, 2), f"top_k must be 1 or 2 (DeepSpeed gating), got {self.top_k}"),
            ("num_experts", self.num_experts >= self.top_k,
             f"num_experts {self.num_experts} is smaller than top_k {self.top_k}"),
            ("max_text_len", self.max_text_len >= 3, "max_text_len must hold [CLS], one token and [SEP]"),
            ("position_init", self.position_init in ("sincos", "normal"),
             f"position_init must be 'sincos' or 'normal', got {self.position_init!r}"),
            ("hidden_size", self.position_init != "sincos" or self.hidden_size % 4 == 0,
             f"position_init 'sincos' needs a hidden_size divisible by 4, got {self.hidden_size}"),
        ]
        for key, ok, message in checks:
            if not ok:
                raise ConfigError(f"invalid model config '{key}': {message}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        return self.num_patches + 1  # [CLS_img] + patches

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "EVEConfig":
        """A config as eve-ds saved it (checkpoints, consolidated folders). Keys added since then take the
        value that the saved model was trained with, which for some is not today's default."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**{**SAVED_BEFORE_THE_KEY_EXISTED, **values})

    def differences(self, other: "EVEConfig") -> dict:
        """{key: (this config's value, other's value)} for every key in which the two differ."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {key: (mine[key], theirs[key]) for key in mine if mine[key] != theirs[key]}

    def replace(self, **changes) -> "EVEConfig":
        return replace(self, **changes)


# Configs saved before a key existed computed with these values.
SAVED_BEFORE_THE_KEY_EXISTED = {"routing_embedding_to_experts": False, "position_init": "normal"}

PRESETS = {
    # Small enough to train in seconds on CPU, yet with two MoE layers of four experts.
    "eve-tiny": EVEConfig(image_size=96, max_text_len=40, vocab_size=1000, hidden_size=128, num_layers=4,
                          num_heads=4, ffn_hidden_size=512, moe_layers=(2, 3), num_experts=4,
                          drop_path_rate=0.0),
    # The released EVE sizes.
    "eve-base": EVEConfig(hidden_size=768, num_layers=12, num_heads=12, ffn_hidden_size=3072,
                          moe_layers=(10, 11), num_experts=32),
    "eve-large": EVEConfig(hidden_size=1024, num_layers=24, num_heads=16, ffn_hidden_size=4096,
                           moe_layers=(21, 22, 23), num_experts=32),
}


def preset(name: str) -> EVEConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model '{name}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
