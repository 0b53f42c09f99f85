"""What the fine-tuning task models share: the pre-trained EVE encoder, its loading, and the heads' parts.

Each task model (``vqa.VQAModel``, ``nlvr2.NLVR2Model``, ``retrieval.RetrievalModel``) is EVE plus a head;
its ``forward(**batch)`` returns a dict with the ``loss`` to back-propagate and its detached parts.
"""
import torch
from torch import nn

from eve_ds.checkpoint.pretrained import StoredWeights, load_weights, open_pretrained
from eve_ds.config import EVEConfig
from eve_ds.engine import build_model
from eve_ds.model import EVE, ExpertPlacement
from eve_ds.model.init import fresh_seed, init_modules_, seeded_generator


def classifier(in_features: int, hidden_features: int, num_classes: int) -> nn.Sequential:
    """The authors' classification head: Linear -> LayerNorm -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(in_features, hidden_features), nn.LayerNorm(hidden_features), nn.GELU(),
                         nn.Linear(hidden_features, num_classes))


def encoder_weights(weights: StoredWeights, encoder: EVE, placement: ExpertPlacement) -> StoredWeights:
    """The pre-trained weights (``open_pretrained``) that ``encoder``, holding ``placement``'s experts, takes, under
    the encoder's own names."""
    return weights.renamed(placement.global_names(encoder, prefix="encoder."))


class TaskModel(nn.Module):
    """EVE (``self.encoder``) plus a task head built by the subclass.

    ``aux_weight`` scales the MoE load-balancing loss (the encoder's: the mean over MoE layers) added to the
    task loss; None takes the class's ``default_aux_weight``, and where that is None too, the pre-training
    weight ``config.aux_loss_weight`` (0.001, the authors' ``gateloss_weight``).
    """
    default_aux_weight = None

    def __init__(self, config: EVEConfig, placement: ExpertPlacement = None, aux_weight: float = None):
        super().__init__()
        self.config = config
        self.heads_seed = fresh_seed()
        self.encoder = EVE(config, placement)
        if aux_weight is None:
            aux_weight = self.default_aux_weight if self.default_aux_weight is not None else config.aux_loss_weight
        self.aux_weight = aux_weight

    def init_head_weights(self):
        """Initialises every module outside the encoder as EVE initialises its own."""
        init_modules_((module for name, module in self.named_modules()
                       if name not in ("", "encoder") and not name.startswith("encoder.")),
                      self.config.init_std, seeded_generator(self.heads_seed))

    @classmethod
    def from_pretrained(cls, path, image_size: int = None, max_text_len: int = None,
                        placement: ExpertPlacement = None, ds_config: dict = None, **head_options) -> "TaskModel":
        """The task model with its encoder from a consolidated checkpoint folder (tools/consolidate.py) and a
        freshly initialised head. ``image_size`` and ``max_text_len`` are ``EVE.from_pretrained``'s; with an
        expert-parallel ``placement`` the encoder keeps only this rank's experts. Under a ZeRO-3 ``ds_config``
        the model is built partitioned (``engine.build_model``) and the weights are read into the partitions
        one tensor at a time: no rank holds the whole model or the whole file. ``new_parameter_names()`` then
        names what the checkpoint did not hold."""
        weights, config = open_pretrained(path, image_size, max_text_len)
        return cls.from_weights(weights, config, placement, ds_config, **head_options)

    @classmethod
    def from_weights(cls, weights: StoredWeights, config: EVEConfig, placement: ExpertPlacement = None,
                     ds_config: dict = None, **head_options) -> "TaskModel":
        """``from_pretrained`` from a folder already opened: ``open_pretrained``'s weights and config."""
        placement = placement or ExpertPlacement(config.num_experts)
        model = build_model(lambda: cls(config, placement, **head_options), ds_config or {})
        load_weights(model.encoder, encoder_weights(weights, model.encoder, placement), weights.path)
        return model

    def new_parameter_names(self) -> frozenset:
        """Parameters that pre-training does not provide (the head, projections, temperature): the optimizer
        gives them the learning-rate multiplier, as the authors do for the keys missing from their checkpoint."""
        return frozenset(name for name, _ in self.named_parameters() if not name.startswith("encoder."))

    def text_cls(self, hidden: torch.Tensor) -> torch.Tensor:
        """The text [CLS] state of a joint encoding [CLS_img, patches..., CLS_txt, text...]."""
        return hidden[:, self.config.num_image_tokens]

    def outputs_with_loss(self, task_loss: torch.Tensor, aux_loss: torch.Tensor, **parts) -> dict:
        """The output dict: the loss to back-propagate and its detached parts (plus ``parts`` as given)."""
        return {"loss": task_loss + self.aux_weight * aux_loss, "task_loss": task_loss.detach(),
                "aux_loss": aux_loss.detach(), **parts}
