"""NLVR2: is a sentence true of a pair of images? The authors' two heads (ssyze/EVE models/model_nlvr_beit.py):
bi-attention between the two encodings (their ``--biattn``, which their README's recipe uses: the default), or
an MLP on the two text [CLS] states.

The bi-attention head keeps the authors' module and parameter names, under ``head.`` (their ``attn1`` is
``head.attn1`` here, and so on).
"""
import torch
import torch.nn.functional as F
from torch import nn

from eve_ds.config import EVEConfig
from eve_ds.finetune.heads import TaskModel, classifier
from eve_ds.model import ExpertPlacement

HEADS = ("biattn", "mlp")
BIATTN_DROPOUT = 0.1  # the authors' attention_probs_dropout_prob, also used after the fusion layer and in the pool


class CrossAttention(nn.Module):
    """Multi-head attention of one sequence (the queries) over another (keys and values), as the PyTorch
    MultiheadAttention the authors copied (models/attention.py): one in-projection [3d, d] with a bias, whose rows
    are the query, key and value projections in that order; softmax(q k^T / sqrt(head width)) over the other
    sequence's tokens that are not padding; dropout on the attention weights; an out-projection with a bias."""
    normal_init_parameters = ("in_proj_weight", )

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * hidden_size))
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, queries, context, context_keep):
        """queries [B, T, d], context [B, S, d], context_keep [B, S] (True: a token to attend to) -> [B, T, d]."""
        batch, length, width = queries.shape
        query_weight, key_value_weight = self.in_proj_weight.split([width, 2 * width])
        query_bias, key_value_bias = self.in_proj_bias.split([width, 2 * width])
        q = F.linear(queries, query_weight, query_bias)
        k, v = F.linear(context, key_value_weight, key_value_bias).chunk(2, dim=-1)
        q, k, v = (x.view(batch, x.shape[1], self.num_heads, -1).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=context_keep[:, None, None, :],
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class AttentionPool(nn.Module):
    """A weighted sum of a sequence's states over its tokens that are not padding, the weights
    softmax(ReLU(Linear(d, 1)(state))) with dropout on them."""

    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(hidden_size, 1), nn.ReLU())
        self.dropout = nn.Dropout(dropout)

    def forward(self, states, keep):
        """states [B, T, d], keep [B, T] -> [B, d]."""
        scores = self.fc(states).squeeze(-1).masked_fill(~keep, float("-inf"))
        weights = self.dropout(scores.softmax(dim=-1))
        return (weights.unsqueeze(1) @ states).squeeze(1)


class BiAttentionHead(nn.Module):
    """The authors' ``--biattn`` head on the two joint encodings (after the final norm) of the sentence with the
    left and with the right image: each sequence attends to the other (``attn1``: left over right, ``attn2``:
    right over left, each query and key being any token of the sequence, image or text); each side's attended
    states, concatenated with its own, go through one shared ``fc`` (Linear 2d -> d, ReLU, dropout); one shared
    ``attn_pool`` pools each side to [B, d]; ``nlvr2_output`` (Linear 2d -> 2) classifies [left; right]."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float = BIATTN_DROPOUT):
        super().__init__()
        self.attn1 = CrossAttention(hidden_size, num_heads, dropout)
        self.attn2 = CrossAttention(hidden_size, num_heads, dropout)
        self.fc = nn.Sequential(nn.Linear(2 * hidden_size, hidden_size), nn.ReLU(), nn.Dropout(dropout))
        self.attn_pool = AttentionPool(hidden_size, dropout)
        self.nlvr2_output = nn.Linear(2 * hidden_size, 2)

    def forward(self, left, right, keep):
        """left, right [B, T, d]; keep [B, T], True for the tokens that are not padding (the same sentence on both
        sides) -> logits [B, 2]."""
        left_fused = self.fc(torch.cat([self.attn1(left, right, keep), left], dim=-1))
        right_fused = self.fc(torch.cat([self.attn2(right, left, keep), right], dim=-1))
        return self.nlvr2_output(torch.cat([self.attn_pool(left_fused, keep), self.attn_pool(right_fused, keep)],
                                           dim=-1))


class NLVR2Model(TaskModel):
    """The sentence is encoded jointly with each image, in two passes of B as the authors run them; ``head``
    "biattn" (the default) is ``BiAttentionHead`` on the two encodings, "mlp" the classifier on the two text
    [CLS] states concatenated (Linear 2d -> 2d, LayerNorm, GELU, Linear 2d -> 2).

    Two passes, not one of 2B: the encoder treats samples independently except for the MoE capacity limit, which
    counts the tokens of a pass, so one pass of 2B drops other routes than the authors' two passes. The MoE loss
    is the mean of the two passes' (each the mean over MoE layers), the authors' mean over passes of each
    layer's loss, averaged over layers.
    """
    task = "nlvr2"
    chosen_head_options = ("head", )

    def __init__(self, config: EVEConfig, placement: ExpertPlacement = None, aux_weight: float = None,
                 head: str = "biattn"):
        super().__init__(config, placement, aux_weight)
        if head not in HEADS:
            raise ValueError(f"unknown NLVR2 head '{head}'; choose one of {', '.join(HEADS)}")
        self.head_type = head
        width = config.hidden_size
        if head == "biattn":
            self.head = BiAttentionHead(width, config.num_heads)
        else:
            self.head = classifier(2 * width, 2 * width, 2)
        self.init_head_weights()

    def head_options(self) -> dict:
        return {"head": self.head_type}

    def forward(self, images, text_ids, text_padding_mask, labels=None) -> dict:
        """images [B, 2, C, H, W] (the left and right image of each example), sentence ids and padding mask
        [B, L], ``labels`` [B] (1 = true; training only). Returns ``logits`` [B, 2] and ``prediction``, plus
        ``loss``, ``task_loss`` and ``aux_loss`` when labels are given."""
        # Each pass runs through the encoder's forward, where ZeRO-3 gathers its own parameters.
        left, left_aux = self.encoder(images[:, 0], text_ids, text_padding_mask)
        right, right_aux = self.encoder(images[:, 1], text_ids, text_padding_mask)
        if self.head_type == "biattn":
            keep = torch.cat([text_padding_mask.new_ones(len(text_ids), self.config.num_image_tokens),
                              text_padding_mask], dim=1).bool()
            logits = self.head(left, right, keep)
        else:
            logits = self.head(torch.cat([self.text_cls(left), self.text_cls(right)], dim=-1))
        outputs = {"logits": logits.detach(), "prediction": logits.detach().argmax(dim=-1)}
        if labels is None:
            return outputs
        return self.outputs_with_loss(F.cross_entropy(logits.float(), labels), (left_aux + right_aux) / 2, **outputs)
