"""Image-text contrastive learning (ITC) and image-text matching with hard negatives (ITM), as VLMo pre-trains and
the authors' retrieval fine-tuning trains them: one implementation for the retrieval job and for pre-training
(``--objectives itc,itm``).

Under torch.distributed the contrastive loss sees the features of every data-parallel rank, and hard negatives are
drawn from every rank's pairs; each rank must then hold the same number of pairs with texts of the same (padded)
length.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.nn.functional import all_gather as all_gather_with_grad

INITIAL_TEMPERATURE = 0.07
TEMPERATURE_RANGE = (0.001, 0.5)


class _ClampTowardsRange(torch.autograd.Function):
    """``value.clamp(low, high)`` whose gradient is not cut at the bounds: inside the range it passes unchanged,
    outside it passes where it leads back into the range (a descent step moves by -grad) and is zeroed where it
    leads further out."""

    @staticmethod
    def forward(ctx, value, low, high):
        ctx.save_for_backward(value < low, value > high)
        return value.clamp(low, high)

    @staticmethod
    def backward(ctx, grad):
        below, above = ctx.saved_tensors
        outwards = (below & (grad > 0)) | (above & (grad < 0))
        return grad.masked_fill(outwards, 0.0), None, None


def clamp_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """The temperature the contrastive loss uses: the parameter clamped to ``TEMPERATURE_RANGE``. The authors clamp
    the parameter in place, which would not persist here (under ZeRO-3 it is a gathered copy, and a bf16 engine's
    fp32 master overwrites it), so the value is clamped instead, with a gradient that still leads a parameter past
    a bound back into the range (a plain clamp gives none there, and the temperature stayed stuck at 0.001)."""
    return _ClampTowardsRange.apply(temperature, *TEMPERATURE_RANGE)


def _data_parallel() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor concatenated along dim 0, rank order; the gradient reaches this rank's part."""
    if not _data_parallel():
        return tensor
    return torch.cat(all_gather_with_grad(tensor))


@torch.no_grad()
def gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor concatenated along dim 0, rank order, without gradient."""
    if not _data_parallel():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def contrastive_loss(logits: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a [pairs, pairs] image-to-text similarity matrix (row i: the image of pair i,
    column j: the text of pair j). Every pair showing the same image is a positive, and the target spreads
    evenly over the positives."""
    positives = image_ids[:, None] == image_ids[None, :]
    targets = positives.float() / positives.sum(dim=1, keepdim=True)
    logits = logits.float()
    image_to_text = -(F.log_softmax(logits, dim=1) * targets).sum(dim=1).mean()
    text_to_image = -(F.log_softmax(logits.t(), dim=1) * targets).sum(dim=1).mean()
    return (image_to_text + text_to_image) / 2


@torch.no_grad()
def sample_hard_negatives(logits: torch.Tensor, image_ids: torch.Tensor, rows: slice) -> tuple:
    """For the pairs ``rows`` of a [pairs, pairs] similarity matrix: a negative text for each image and a
    negative image for each text, drawn with probability proportional to the softmax of the similarities
    over the candidates that do not show the same image (from the global torch RNG). Returns (text index
    per image, image index per text), both indices into all pairs."""
    positives = image_ids[:, None] == image_ids[None, :]
    if positives[rows].all(dim=1).any():
        raise ValueError("a retrieval batch needs at least two different images to draw negatives from")
    # Softmax over the negatives alone is the softmax over all, renormalised, and it never underflows to zero.
    text_weights = logits.float().masked_fill(positives, float("-inf"))[rows].softmax(dim=1)
    image_weights = logits.float().t().masked_fill(positives, float("-inf"))[rows].softmax(dim=1)
    return torch.multinomial(text_weights, 1).squeeze(1), torch.multinomial(image_weights, 1).squeeze(1)


class ContrastiveMatching:
    """For a module with ``self.encoder`` (EVE) and ``self.config``: a dual encoder (the image [CLS] of
    ``encode_image`` and the text [CLS] of ``encode_text``, each through its own projection, L2-normalised, compared
    at a learnable temperature) and a matching head (Linear(d, 2) on the text [CLS] state of the joint encoding).

    As in the authors' code, the contrastive loss takes the [CLS] states after the encoder's final LayerNorm, and
    the evaluation embeddings take them before it."""

    def add_contrastive_heads(self, matching: bool = True):
        width = self.config.hidden_size
        self.image_projection = nn.Linear(width, width, bias=False)
        self.text_projection = nn.Linear(width, width, bias=False)
        # One element, not a scalar: DeepSpeed broadcasts parameters as bytes, which a 0-d tensor cannot be viewed as.
        self.temperature = nn.Parameter(torch.tensor([INITIAL_TEMPERATURE]))
        if matching:
            self.itm_head = nn.Linear(width, 2)

    def contrastive_heads(self) -> list:
        """The modules ``add_contrastive_heads`` made (for their initialisation)."""
        return [module for module in (self.image_projection, self.text_projection, getattr(self, "itm_head", None))
                if module is not None]

    def _image_features(self, images, final_norm=True) -> tuple:
        hidden, aux_loss = self.encoder.encode_image(images, final_norm=final_norm)
        return F.normalize(self.image_projection(hidden[:, 0]).float(), dim=-1), aux_loss

    def _text_features(self, text_ids, text_padding_mask, final_norm=True) -> tuple:
        hidden, aux_loss = self.encoder.encode_text(text_ids, text_padding_mask, final_norm=final_norm)
        return F.normalize(self.text_projection(hidden[:, 0]).float(), dim=-1), aux_loss

    def _match_logits(self, images, text_ids, text_padding_mask) -> tuple:
        hidden, aux_loss = self.encoder(images, text_ids, text_padding_mask)
        return self.itm_head(hidden[:, self.config.num_image_tokens]).float(), aux_loss

    def contrastive_matching(self, images, text_ids, text_padding_mask, image_ids=None, matching: bool = True) -> dict:
        """The ITC loss of a batch of pairs (images [B, C, H, W], caption ids and padding mask [B, L], ``image_ids``
        [B]: which image each pair shows, pairs with equal ids being positives of one another; default: every pair
        its own image) and, with ``matching``, the ITM loss: cross entropy over the B positive pairs, B pairs of a
        hard-negative image with each text and B of each image with a hard-negative text (logits in that order).

        Returns {"itc_loss", "temperature", "aux_losses" (one per encoder pass: image alone, text alone, and with
        ``matching`` the three matching passes)} and with ``matching`` "itm_loss" and "itm_logits" (detached)."""
        batch = images.shape[0]
        rank = dist.get_rank() if _data_parallel() else 0
        if image_ids is None:
            image_ids = torch.arange(batch, device=images.device) + rank * batch
        temperature = clamp_temperature(self.temperature)
        image_features, image_aux = self._image_features(images)
        text_features, text_aux = self._text_features(text_ids, text_padding_mask)
        all_image_ids = gather(image_ids)
        logits = gather_with_grad(image_features) @ gather_with_grad(text_features).t() / temperature
        parts = {"itc_loss": contrastive_loss(logits, all_image_ids), "temperature": temperature.detach()[0],
                 "aux_losses": [image_aux, text_aux]}
        if not matching:
            return parts

        negative_text, negative_image = sample_hard_negatives(logits.detach(), all_image_ids,
                                                              slice(rank * batch, (rank + 1) * batch))
        all_images, all_text_ids, all_padding = gather(images), gather(text_ids), gather(text_padding_mask)
        # Three joint passes of B pairs, as the authors run them, not one of 3B: an expert's capacity counts the
        # tokens of a pass, so the size of a pass decides which routes are dropped, and each pass has its own
        # load-balancing loss.
        matching_passes = [(images, text_ids, text_padding_mask),
                           (all_images[negative_image], text_ids, text_padding_mask),
                           (images, all_text_ids[negative_text], all_padding[negative_text])]
        match_logits, match_aux = zip(*(self._match_logits(*inputs) for inputs in matching_passes))
        match_logits = torch.cat(match_logits)
        match_labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(match_logits.device)
        parts.update(itm_loss=F.cross_entropy(match_logits, match_labels), itm_logits=match_logits.detach())
        parts["aux_losses"] += list(match_aux)
        return parts
