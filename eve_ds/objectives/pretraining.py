"""The pre-training model: EVE with the heads of its objectives, a weighted sum of their losses.

Objectives (``--objectives NAME[=WEIGHT],...``; the default is EVE's ``msm``):

- ``msm``, masked signal modeling (``msm.py``): masked pixels and masked tokens of the joint encoding of a masked
  image with a masked caption;
- ``itc``, image-text contrastive learning (``contrastive.py``): the dual encoder's image-only and text-only [CLS]
  states, negatives gathered over every rank, a learnable temperature;
- ``itm``, image-text matching on the joint encoding, with hard negatives drawn from the contrastive similarities
  (so it needs ``itc``);
- ``mlm``, masked language modeling: the caption's tokens masked at VLMo's 15%, predicted from its joint encoding
  with the whole image, by the same text head as ``msm``'s.

VLMo's recipe is ``itc,itm,mlm``. A micro-batch of an image-only source (images without captions) trains masked
image modeling through the image-only encoding (msm's image loss, so it needs ``msm``); one of a text-only source
trains masked language modeling through the text-only encoding: ``mlm``'s where the run has it, else msm's text
loss. The MoE load-balancing loss is the mean over every encoder pass of the step of each
pass's loss (the mean over MoE layers), weighted ``config.aux_loss_weight``: with ``msm`` alone, its one pass's.
"""
import torch
import torch.nn.functional as F
from torch import nn

from eve_ds.config import EVEConfig
from eve_ds.errors import UsageError
from eve_ds.model import EVE, ExpertPlacement
from eve_ds.model.init import fresh_seed, init_modules_, seeded_generator
from eve_ds.objectives.contrastive import ContrastiveMatching
from eve_ds.objectives.masking import IGNORE_INDEX
from eve_ds.objectives.msm import normalized_pixel_targets

OBJECTIVES = ("msm", "itc", "itm", "mlm")
DEFAULT_OBJECTIVES = {"msm": 1.0}
# The losses each objective reports (metrics.jsonl, tensorboard, the console), besides "loss" and "aux_loss".
OBJECTIVE_LOSSES = {"msm": ("image_loss", "text_loss"), "itc": ("itc_loss", ), "itm": ("itm_loss", ),
                    "mlm": ("mlm_loss", )}
MLM_MASK_RATIO = 0.15  # VLMo's


def parse_objectives(text: str) -> dict:
    """{name: weight} of "msm", "itc,itm,mlm" or "msm,itc=0.5,itm=0.5" (a weight defaults to 1); UsageError with
    one sentence for a name that is not an objective, a weight that is not a positive number, a name given twice,
    or itm without itc."""
    objectives = {}
    for part in text.split(","):
        name, _, weight = part.strip().partition("=")
        if name not in OBJECTIVES:
            raise UsageError(f"--objectives: unknown objective '{name}'; choose from {', '.join(OBJECTIVES)}")
        if name in objectives:
            raise UsageError(f"--objectives: {name} is given twice")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = float("nan")
        if not value > 0 or value == float("inf"):
            raise UsageError(f"--objectives: the weight of {name} must be a positive number, got '{weight}'")
        objectives[name] = value
    if "itm" in objectives and "itc" not in objectives:
        raise UsageError("--objectives: itm draws its hard negatives from itc's similarities; add itc")
    return objectives


def describe_objectives(objectives: dict) -> str:
    return ",".join(name if weight == 1 else f"{name}={weight:g}" for name, weight in objectives.items())


def check_modalities(objectives: dict, modalities) -> None:
    """UsageError where a source's modality has no loss among ``objectives``."""
    if "images" in modalities and "msm" not in objectives:
        raise UsageError("--data: image-only sources (images:) train masked image modeling, msm's image loss; add "
                         "msm to --objectives")
    if "texts" in modalities and not {"msm", "mlm"} & set(objectives):
        raise UsageError("--data: text-only sources (texts:) train masked language modeling; add mlm (or msm) to "
                         "--objectives")


def loss_names(objectives: dict) -> tuple:
    return ("loss", *(name for objective in objectives for name in OBJECTIVE_LOSSES[objective]), "aux_loss")


def token_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of ``head`` over the text positions of ``hidden`` whose label is not IGNORE_INDEX (0 where
    there is none)."""
    chosen = labels != IGNORE_INDEX
    logits = head(hidden[chosen]).float()
    return F.cross_entropy(logits, labels[chosen], reduction="sum") / chosen.sum().clamp(min=1)


class PretrainingModel(ContrastiveMatching, nn.Module):
    """EVE with the heads its objectives need; ``forward(**batch)`` returns the loss and its parts (detached)."""

    def __init__(self, config: EVEConfig, placement: ExpertPlacement = None, objectives: dict = None):
        super().__init__()
        self.config = config
        self.objectives = dict(objectives or DEFAULT_OBJECTIVES)
        heads_seed = fresh_seed()
        self.encoder = EVE(config, placement)
        heads = []
        if "msm" in self.objectives:
            self.image_head = nn.Linear(config.hidden_size, config.patch_size**2 * config.in_channels)
            heads.append(self.image_head)
        if "msm" in self.objectives or "mlm" in self.objectives:
            self.text_head = nn.Linear(config.hidden_size, config.vocab_size)
            heads.append(self.text_head)
        if "itc" in self.objectives:
            self.add_contrastive_heads(matching="itm" in self.objectives)
            heads += self.contrastive_heads()
        init_modules_(heads, config.init_std, seeded_generator(heads_seed))
        self.heads = tuple(heads)

    @property
    def loss_names(self) -> tuple:
        return loss_names(self.objectives)

    @classmethod
    def from_pretrained(cls, path, image_size: int = None, max_text_len: int = None) -> "PretrainingModel":
        """Encoder and pre-training heads from a consolidated checkpoint folder of a pre-training run
        (tools/consolidate.py); the options are ``EVE.from_pretrained``'s, which loads the encoder of any folder."""
        from eve_ds.checkpoint.pretrained import PRETRAINING, CheckpointError, held_model, load_weights, open_pretrained

        held = held_model(path)
        if held.task != PRETRAINING:
            raise CheckpointError(f"{path} holds {held.describe()}, without the pre-training heads "
                                  "(EVE.from_pretrained loads its encoder)")
        weights, config = open_pretrained(path, image_size, max_text_len)
        return load_weights(cls(config, objectives=held.head_options.get("objectives")), weights, path)

    def check_reconstructs(self, source):
        """CheckpointError unless the model has masked signal modeling's heads (what the reconstruction grid and
        the grounding probe read)."""
        if "msm" not in self.objectives:
            from eve_ds.checkpoint.pretrained import CheckpointError

            raise CheckpointError(f"{source} was pre-trained with --objectives {describe_objectives(self.objectives)}, "
                                  "without masked signal modeling's image and text heads")

    def forward(self, images=None, image_mask=None, text_ids=None, text_labels=None, text_padding_mask=None,
                plain_text_ids=None, mlm_text_ids=None, mlm_text_labels=None):
        """images [B, C, H, W] (whole); for ``msm`` the patches to mask ``image_mask`` [B, P] and the masked caption
        ``text_ids`` with its ``text_labels`` [B, L]; for ``itc``/``itm`` the caption unmasked (``plain_text_ids``);
        for ``mlm`` the caption masked at MLM_MASK_RATIO (``mlm_text_ids``, ``mlm_text_labels``). The padding mask
        is the caption's, whatever the masking. A batch without texts (``images`` and ``image_mask``) or without
        images (the text keys) is one of a unimodal source; its outputs hold the losses it trains."""
        if text_padding_mask is None:
            return self.image_only(images, image_mask)
        if images is None:
            return self.text_only(text_ids, text_labels, text_padding_mask, mlm_text_ids, mlm_text_labels)
        parts, aux_losses, loss = {}, [], 0.0
        if "itc" in self.objectives:
            pairs = self.contrastive_matching(images, plain_text_ids, text_padding_mask,
                                              matching="itm" in self.objectives)
            aux_losses += pairs["aux_losses"]
            parts.update(itc_loss=pairs["itc_loss"], temperature=pairs["temperature"])
            loss = loss + self.objectives["itc"] * pairs["itc_loss"]
            if "itm" in self.objectives:
                parts["itm_loss"] = pairs["itm_loss"]
                loss = loss + self.objectives["itm"] * pairs["itm_loss"]
        if "mlm" in self.objectives:
            hidden, aux_loss = self.encoder(images, mlm_text_ids, text_padding_mask)
            parts["mlm_loss"] = token_loss(self.text_head, hidden[:, self.config.num_image_tokens:], mlm_text_labels)
            aux_losses.append(aux_loss)
            loss = loss + self.objectives["mlm"] * parts["mlm_loss"]
        if "msm" in self.objectives:  # last: tensorboard's reconstruction keeps the heads' last outputs
            hidden, aux_loss = self.encoder(images, text_ids, text_padding_mask, image_mask)
            parts["image_loss"] = self.pixel_loss(hidden, images, image_mask)
            parts["text_loss"] = token_loss(self.text_head, hidden[:, self.config.num_image_tokens:], text_labels)
            aux_losses.append(aux_loss)
            loss = loss + self.objectives["msm"] * (parts["image_loss"] + parts["text_loss"])
        return self.outputs(loss, parts, aux_losses)

    def pixel_loss(self, hidden, images, image_mask):
        """MSE of the image head's prediction of the masked patches' normalised pixels, from the encoding ``hidden``
        whose image tokens come first."""
        pixel_prediction = self.image_head(hidden[:, 1:self.config.num_image_tokens][image_mask]).float()
        pixel_target = normalized_pixel_targets(images, self.config.patch_size)[image_mask]
        return F.mse_loss(pixel_prediction, pixel_target, reduction="sum") / max(pixel_target.numel(), 1)

    def image_only(self, images, image_mask):
        hidden, aux_loss = self.encoder.encode_image(images, image_mask)
        image_loss = self.pixel_loss(hidden, images, image_mask)
        loss = self.objectives["msm"] * image_loss + self.idle_heads(hidden, self.image_head)
        return self.outputs(loss, {"image_loss": image_loss}, [aux_loss])

    def text_only(self, text_ids, text_labels, text_padding_mask, mlm_text_ids=None, mlm_text_labels=None):
        objective = "mlm" if "mlm" in self.objectives else "msm"
        ids, labels = (mlm_text_ids, mlm_text_labels) if objective == "mlm" else (text_ids, text_labels)
        hidden, aux_loss = self.encoder.encode_text(ids, text_padding_mask)
        text_loss = token_loss(self.text_head, hidden, labels)
        loss = self.objectives[objective] * text_loss + self.idle_heads(hidden, self.text_head)
        return self.outputs(loss, {"mlm_loss" if objective == "mlm" else "text_loss": text_loss}, [aux_loss])

    def idle_heads(self, hidden, used: nn.Module):
        """0, with every head but ``used`` (and the temperature) in the graph on no input, so that each gets a gradient
        of zeros, as the encoder's unused embeddings do (see ``EVE.forward``: ZeRO-3 would reuse stale gradients)."""
        nothing = hidden[:0, 0]
        term = sum(head(nothing).sum() for head in self.heads if head is not used)
        if "itc" in self.objectives:
            term = term + self.temperature.sum()
        return 0.0 * term

    def outputs(self, loss, parts: dict, aux_losses: list) -> dict:
        # each pass's aux loss is the mean over MoE layers (EVE.forward), weighted as the authors weight their gate loss
        aux_loss = torch.stack(aux_losses).mean()
        return {"loss": loss + self.config.aux_loss_weight * aux_loss, "aux_loss": aux_loss.detach(),
                **{name: value.detach() for name, value in parts.items()}}
