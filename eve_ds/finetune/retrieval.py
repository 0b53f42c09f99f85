"""Image-text retrieval: a dual encoder trained contrastively (ITC), plus an image-text matching head (ITM)
trained on hard negatives and used to re-rank the dual encoder's top candidates (``objectives/contrastive.py``, which
pre-training shares).
"""
import torch

from eve_ds.config import EVEConfig
from eve_ds.finetune.heads import TaskModel
from eve_ds.model import ExpertPlacement
from eve_ds.objectives.contrastive import ContrastiveMatching


class RetrievalModel(ContrastiveMatching, TaskModel):
    """EVE with the dual encoder and the matching head of ``ContrastiveMatching``; the evaluation embeddings
    (``image_embeddings``, ``text_embeddings``) take the [CLS] states before the encoder's final LayerNorm, as the
    authors' ``forward_eval`` does."""
    task = "retrieval"

    def __init__(self, config: EVEConfig, placement: ExpertPlacement = None, aux_weight: float = None):
        super().__init__(config, placement, aux_weight)
        self.add_contrastive_heads()
        self.init_head_weights()

    def forward(self, images, text_ids, text_padding_mask, image_ids=None) -> dict:
        """images [B, C, H, W], caption ids and padding mask [B, L], ``image_ids`` [B]: which image each pair
        shows (pairs with equal ids are positives of one another; default: every pair its own image).

        Loss = ITC + ITM + aux_weight x aux (``contrastive_matching``), where aux is the mean over the five encoder
        passes (image alone, text alone, the three matching passes) of each pass's loss, the mean over MoE layers:
        the authors' gate loss."""
        parts = self.contrastive_matching(images, text_ids, text_padding_mask, image_ids)
        aux_loss = torch.stack(parts["aux_losses"]).mean()
        return self.outputs_with_loss(parts["itc_loss"] + parts["itm_loss"], aux_loss,
                                      itc_loss=parts["itc_loss"].detach(), itm_loss=parts["itm_loss"].detach(),
                                      temperature=parts["temperature"], itm_logits=parts["itm_logits"])

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        """[B, C, H, W] -> [B, hidden_size], unit length, float32; from the [CLS] state before the final
        LayerNorm (the authors' ``forward_eval``)."""
        return self._image_features(images, final_norm=False)[0]

    @torch.no_grad()
    def text_embeddings(self, text_ids, text_padding_mask) -> torch.Tensor:
        """[B, L] -> [B, hidden_size], unit length, float32; from the [CLS] state before the final LayerNorm
        (the authors' ``forward_eval``)."""
        return self._text_features(text_ids, text_padding_mask, final_norm=False)[0]

    @torch.no_grad()
    def match_scores(self, images, text_ids, text_padding_mask) -> torch.Tensor:
        """The ITM logit of "matches" (class 1) for each image-text pair, [B], float32."""
        return self._match_logits(images, text_ids, text_padding_mask)[0][:, 1]

    def pair_scorer(self, images, text_ids, text_padding_mask, batch_size: int = 64):
        """``pair_score(image indices, text indices) -> scores`` over the given evaluation images and texts, in
        chunks of ``batch_size`` pairs: the matching head as ``metrics.rerank`` takes it."""
        def pair_score(image_indices, text_indices):
            scores = []
            for start in range(0, len(image_indices), batch_size):
                chosen_images = image_indices[start:start + batch_size].to(images.device)
                chosen_texts = text_indices[start:start + batch_size].to(text_ids.device)
                scores.append(self.match_scores(images[chosen_images], text_ids[chosen_texts],
                                                text_padding_mask[chosen_texts]).cpu())
            return torch.cat(scores)
        return pair_score
