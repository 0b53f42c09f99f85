"""VQA v2 as answer classification over a fixed answer list (3,128 answers in the authors' setup)."""
import torch
import torch.nn.functional as F

from eve_ds.config import EVEConfig
from eve_ds.finetune.heads import TaskModel, classifier
from eve_ds.model import ExpertPlacement


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross entropy against the soft scores, averaged over questions and answers and then multiplied
    by the number of answers (the authors' scaling: a sum over answers, a mean over questions)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float()) * targets.shape[1]


class VQAModel(TaskModel):
    """The question is encoded jointly with the image; the text [CLS] state goes through the classifier."""
    task = "vqa"
    default_aux_weight = 0.0  # the authors back-propagate the VQA loss alone

    def __init__(self, config: EVEConfig, placement: ExpertPlacement = None, num_answers: int = 3128,
                 aux_weight: float = None):
        super().__init__(config, placement, aux_weight)
        self.num_answers = num_answers
        self.head = classifier(config.hidden_size, 2 * config.hidden_size, num_answers)
        self.init_head_weights()

    def head_options(self) -> dict:
        return {"num_answers": self.num_answers}

    def forward(self, images, text_ids, text_padding_mask, targets=None) -> dict:
        """images [B, C, H, W], question ids and padding mask [B, L], soft ``targets`` [B, num_answers]
        (VQA scores; training only). Returns ``logits`` and the predicted answer index ``prediction``, plus
        ``loss``, ``task_loss`` and ``aux_loss`` when targets are given."""
        hidden, aux_loss = self.encoder(images, text_ids, text_padding_mask)
        logits = self.head(self.text_cls(hidden))
        outputs = {"logits": logits.detach(), "prediction": logits.detach().argmax(dim=-1)}
        if targets is None:
            return outputs
        return self.outputs_with_loss(vqa_loss(logits, targets), aux_loss, **outputs)
