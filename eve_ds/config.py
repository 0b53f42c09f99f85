"""Model configuration and the named presets (eve-tiny, eve-base, eve-large; vlmo-tiny, vlmo-base, vlmo-large)."""
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
    # False: plain top-k routing on the hidden state, with no modality embedding anywhere (an ablation of EVE's
    # modality-aware routing).
    modality_aware_routing: bool = True
    # 0-based indices of the layers whose FFN for the joint image-text sequence is one dense vision-language FFN
    # (VLMo's VL-FFN), of width vl_ffn_hidden_size (0: ffn_hidden_size); an image or a text encoded alone still
    # takes those layers' vision or text FFN.
    vl_ffn_layers: tuple = ()
    vl_ffn_hidden_size: int = 0
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
        object.__setattr__(self, "vl_ffn_layers", tuple(self.vl_ffn_layers))
        checks = [
            ("hidden_size", self.hidden_size % self.num_heads == 0,
             f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"),
            ("image_size", self.image_size % self.patch_size == 0,
             f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"),
            ("moe_layers", all(0 <= i < self.num_layers for i in self.moe_layers),
             f"moe_layers {self.moe_layers} must lie in [0, num_layers={self.num_layers})"),
            ("vl_ffn_layers", all(0 <= i < self.num_layers for i in self.vl_ffn_layers),
             f"vl_ffn_layers {self.vl_ffn_layers} must lie in [0, num_layers={self.num_layers})"),
            ("vl_ffn_layers", not set(self.vl_ffn_layers) & set(self.moe_layers),
             f"layers {sorted(set(self.vl_ffn_layers) & set(self.moe_layers))} are in both moe_layers and "
             "vl_ffn_layers; a layer has one FFN for the joint sequence"),
            ("vl_ffn_hidden_size", self.vl_ffn_hidden_size >= 0,
             f"vl_ffn_hidden_size must be positive (or 0: ffn_hidden_size), got {self.vl_ffn_hidden_size}"),
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

    @property
    def routed_experts(self) -> int:
        """Experts per MoE layer, 0 for a model without MoE layers (nothing to place over expert-parallel ranks)."""
        return self.num_experts if self.moe_layers else 0

    @property
    def vl_ffn_width(self) -> int:
        return self.vl_ffn_hidden_size or self.ffn_hidden_size

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

    def differences_said(self, saved: "EVEConfig") -> str:
        """The keys in which ``saved`` (a checkpoint's config) differs from this run's, in words; empty where none."""
        return ", ".join(f"{key} {theirs} where this run has {mine}"
                         for key, (mine, theirs) in self.differences(saved).items())

    def replace(self, **changes) -> "EVEConfig":
        return replace(self, **changes)

    def with_settings(self, settings: list) -> "EVEConfig":
        """This config with ``KEY=VALUE`` changes (``--model-setting``), each value read as its key's type:
        ``true``/``false``, a number, or comma-separated layer indices (``10,11``; empty for none)."""
        kinds = {f.name: type(f.default) for f in fields(self)}
        changes = {}
        for setting in settings:
            key, equals, text = setting.partition("=")
            if not equals or key not in kinds:
                raise ConfigError(f"model setting {setting!r} is not KEY=VALUE with KEY one of {', '.join(kinds)}")
            kind = kinds[key]
            try:
                if kind is bool:
                    if text.lower() not in ("true", "false"):
                        raise ValueError
                    changes[key] = text.lower() == "true"
                elif kind is tuple:
                    changes[key] = tuple(int(part) for part in text.split(",") if part.strip())
                else:
                    changes[key] = kind(text)
            except ValueError:
                raise ConfigError(f"model setting {setting!r}: {text!r} is not a {kind.__name__}") from None
        return self.replace(**changes)


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
    # VLMo's sizes (Bao et al.): multiway layers throughout, a dense VL-FFN in the top layers instead of EVE's MoE.
    "vlmo-tiny": EVEConfig(image_size=96, max_text_len=40, vocab_size=1000, hidden_size=128, num_layers=4,
                           num_heads=4, ffn_hidden_size=512, moe_layers=(), vl_ffn_layers=(2, 3), drop_path_rate=0.0),
    "vlmo-base": EVEConfig(hidden_size=768, num_layers=12, num_heads=12, ffn_hidden_size=3072, moe_layers=(),
                           vl_ffn_layers=(10, 11)),
    "vlmo-large": EVEConfig(hidden_size=1024, num_layers=24, num_heads=16, ffn_hidden_size=4096, moe_layers=(),
                            vl_ffn_layers=(21, 22, 23)),
}


def preset(name: str) -> EVEConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model '{name}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
