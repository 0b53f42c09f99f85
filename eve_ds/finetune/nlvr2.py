"""NLVR2: is a sentence true of a pair of images? The authors' head without ``--biattn``."""
import torch
import torch.nn.functional as F

from eve_ds.config import EVEConfig
from eve_ds.finetune.heads import TaskModel, classifier
from eve_ds.model import ExpertPlacement


class NLVR2Model(TaskModel):
    """The sentence is encoded jointly with each image; the two text [CLS] states, concatenated, go through
    the classifier (true / false).

    Both image-sentence pairs of a batch run as one pass of 2B (the authors run two passes of B). The encoder
    treats samples independently except for the MoE capacity limit, which counts the tokens of the whole
    pass: when experts overflow, one pass drops other routes than two passes would (as many, in proportion).
    Likewise the MoE loss is that of the one pass, where the authors average each layer's loss over their two.
    """

    def __init__(self, config: EVEConfig, placement: ExpertPlacement = None, aux_weight: float = None):
        super().__init__(config, placement, aux_weight)
        self.head = classifier(2 * config.hidden_size, 2 * config.hidden_size, 2)
        self.init_head_weights()

    def forward(self, images, text_ids, text_padding_mask, labels=None) -> dict:
        """images [B, 2, C, H, W] (the left and right image of each example), sentence ids and padding mask
        [B, L], ``labels`` [B] (1 = true; training only). Returns ``logits`` [B, 2] and ``prediction``, plus
        ``loss``, ``task_loss`` and ``aux_loss`` when labels are given."""
        pairs = torch.cat([images[:, 0], images[:, 1]])
        hidden, aux_loss = self.encoder(pairs, text_ids.repeat(2, 1), text_padding_mask.repeat(2, 1))
        left, right = self.text_cls(hidden).chunk(2)
        logits = self.head(torch.cat([left, right], dim=-1))
        outputs = {"logits": logits.detach(), "prediction": logits.detach().argmax(dim=-1)}
        if labels is None:
            return outputs
        return self.outputs_with_loss(F.cross_entropy(logits.float(), labels), aux_loss, **outputs)
