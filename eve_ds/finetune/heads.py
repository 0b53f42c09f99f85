"""What the fine-tuning task models share: the pre-trained EVE encoder, its loading, and the heads' parts.

Each task model (``vqa.VQAModel``, ``nlvr2.NLVR2Model``, ``retrieval.RetrievalModel``) is EVE plus a head;
its ``forward(**batch)`` returns a dict with the ``loss`` to back-propagate and its detached parts.
"""
import logging

import torch
from torch import nn

from eve_ds.checkpoint.pretrained import (FINETUNING_TASKS, PRETRAINING, CheckpointError, HeldModel, StoredWeights,
                                         held_model, load_weights, open_pretrained)
from eve_ds.config import EVEConfig
from eve_ds.engine import build_model
from eve_ds.model import EVE, ExpertPlacement
from eve_ds.model.init import fresh_seed, init_modules_, seeded_generator

logger = logging.getLogger(__name__)


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

    ``head_options()`` are the options the head was built with; of those, ``chosen_head_options`` are a user's
    choice (NLVR2's head type), which a stored head of the task decides, and the others follow the data (VQA's
    number of answers), which a stored head must match.
    """
    task = None  # "vqa", "nlvr2" or "retrieval"
    default_aux_weight = None
    chosen_head_options = ()

    def __init__(self, config: EVEConfig, placement: ExpertPlacement = None, aux_weight: float = None):
        super().__init__()
        self.config = config
        self.heads_seed = fresh_seed()
        self.encoder = EVE(config, placement)
        if aux_weight is None:
            aux_weight = self.default_aux_weight if self.default_aux_weight is not None else config.aux_loss_weight
        self.aux_weight = aux_weight
        self.head_loaded = False  # whether from_weights read the head too
        self.seeded_head = frozenset()  # head parameters from_weights read from a pre-training run's heads

    def head_options(self) -> dict:
        return {}

    def held(self) -> HeldModel:
        return HeldModel(self.task, self.head_options())

    def init_head_weights(self):
        """Initialises every module outside the encoder as EVE initialises its own."""
        init_modules_((module for name, module in self.named_modules()
                       if name not in ("", "encoder") and not name.startswith("encoder.")),
                      self.config.init_std, seeded_generator(self.heads_seed))

    @classmethod
    def from_pretrained(cls, path, image_size: int = None, max_text_len: int = None,
                        placement: ExpertPlacement = None, ds_config: dict = None, require_head: bool = False,
                        **head_options) -> "TaskModel":
        """The task model from a consolidated folder (tools/consolidate.py, tools/convert_released.py import): with
        the folder's head where it holds this task's model (its options, ``fitted_head_options``), else with a
        freshly initialised head, which ``require_head`` refuses. ``image_size`` and ``max_text_len`` are
        ``EVE.from_pretrained``'s; with an expert-parallel ``placement`` the encoder keeps only this rank's experts.
        Under a ZeRO-3 ``ds_config`` the model is built partitioned (``engine.build_model``) and the weights are
        read into the partitions one tensor at a time: no rank holds the whole model or the whole file.
        ``new_parameter_names()`` then names what the folder did not hold."""
        weights, config = open_pretrained(path, image_size, max_text_len)
        return cls.from_weights(weights, config, placement, ds_config, require_head, **head_options)

    @classmethod
    def from_weights(cls, weights: StoredWeights, config: EVEConfig, placement: ExpertPlacement = None,
                     ds_config: dict = None, require_head: bool = False, **head_options) -> "TaskModel":
        """``from_pretrained`` from a folder already opened: ``open_pretrained``'s weights and config."""
        folder = weights.path.parent
        held = held_model(folder)
        same_task = held.task == cls.task
        if same_task:
            head_options = cls.fitted_head_options(held.head_options, head_options, folder)
        elif require_head:
            raise CheckpointError(f"{folder} holds {held.describe()}, which has no {cls.task} head to evaluate: give "
                                  f"a {cls.task} fine-tuning run (--run) or weights with its head (tools/consolidate.py "
                                  "of a fine-tuning run, tools/convert_released.py import of the authors' fine-tuned "
                                  "file)")
        elif held.task in FINETUNING_TASKS:
            logger.info("%s holds %s: its encoder is taken and a new %s head drawn", folder, held.describe(), cls.task)
        placement = placement or ExpertPlacement(config.num_experts)
        model = build_model(lambda: cls(config, placement, **head_options), ds_config or {})
        model.head_loaded = same_task
        module, view = model.stored_part(weights, placement)
        load_weights(module, view, weights.path)
        if held.task == PRETRAINING:  # a head the pre-training trained (retrieval's, after --objectives itc,itm)
            seeded = frozenset(name for name, _ in model.named_parameters()
                               if not name.startswith("encoder.") and name in weights)
            if seeded:
                load_weights(model, weights, weights.path, names=seeded)
                model.seeded_head = seeded
                logger.info("%s holds the %s the pre-training trained: the %s head starts from them", folder,
                            ", ".join(sorted(seeded)), cls.task)
        return model

    @classmethod
    def fitted_head_options(cls, stored: dict, asked: dict, source) -> dict:
        """The options of a stored head of this task: its chosen options (logged where they differ from those
        asked), and the others asked, which must be its own. Raises CheckpointError on a head of another size."""
        fitted = dict(asked)
        for key, value in stored.items():
            if key in cls.chosen_head_options:
                if asked.get(key, value) != value:
                    logger.info("%s holds a %s head with %s %s: continuing with it", source, cls.task, key, value)
                fitted[key] = value
            elif key in asked and asked[key] != value:
                raise CheckpointError(f"{source} holds a {cls.task} head with {key} {value}, but this job's data "
                                      f"makes {key} {asked[key]}: it is a head of another size")
        return fitted

    def stored_part(self, weights: StoredWeights, placement: ExpertPlacement) -> tuple:
        """(module, its stored weights under its own names): the whole model where ``head_loaded``, else the
        encoder (``encoder_weights``)."""
        if self.head_loaded:
            return self, weights.renamed(placement.global_names(self))
        return self.encoder, encoder_weights(weights, self.encoder, placement)

    def new_parameter_names(self) -> frozenset:
        """Parameters that the weights did not provide (a new head, projections, temperature): the optimizer
        gives them the learning-rate multiplier, as the authors do for the keys missing from their checkpoint."""
        if self.head_loaded:
            return frozenset()
        return frozenset(name for name, _ in self.named_parameters()
                         if not name.startswith("encoder.") and name not in self.seeded_head)

    def text_cls(self, hidden: torch.Tensor) -> torch.Tensor:
        """The text [CLS] state of a joint encoding [CLS_img, patches..., CLS_txt, text...]."""
        return hidden[:, self.config.num_image_tokens]

    def outputs_with_loss(self, task_loss: torch.Tensor, aux_loss: torch.Tensor, **parts) -> dict:
        """The output dict: the loss to back-propagate and its detached parts (plus ``parts`` as given)."""
        return {"loss": task_loss + self.aux_weight * aux_loss, "task_loss": task_loss.detach(),
                "aux_loss": aux_loss.detach(), **parts}
