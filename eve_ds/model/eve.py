"""EVE: one shared Transformer over image patches and text tokens (Chen et al., AAAI 2024).

Each pre-norm block has shared self-attention and, per the config, either a multiway FFN (a vision
FFN for image tokens and a text FFN for text tokens) or a modality-aware sparse MoE FFN. The
sequence is ``[CLS_img, patches..., CLS_txt, text..., SEP, pad...]``; image tokens come first. An image
or a text can also be encoded alone (``encode_image``, ``encode_text``).
"""
import torch
import torch.nn.functional as F
from torch import nn

from eve_ds.config import EVEConfig
from eve_ds.model.init import (fresh_seed, init_modules_, seeded_generator, sincos_positions, sincos_table,
                               whole)
from eve_ds.model.moe import TEXT, VISION, ExpertPlacement, ModalityAwareMoE


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class FeedForward(nn.Module):
    """Two-layer MLP with biases: the multiway FFNs and every MoE expert."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_hidden_size)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size)

    def forward(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with BEiT-style biases: queries and values have one, keys none (a key
    bias adds the same score to every key of a query, which the softmax cancels)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(hidden_size))
        self.v_bias = nn.Parameter(torch.zeros(hidden_size))
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, attn_mask):
        batch, length, width = x.shape
        qkv = self.qkv(x) + torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = qkv.view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch of a sample."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if self.rate == 0.0 or not self.training:
            return x
        keep = torch.empty(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
        return x * keep.bernoulli_(1.0 - self.rate) / (1.0 - self.rate)


class MultiwayFFN(nn.Module):
    """Modality-specific pre-norm FFNs (as in VLMo): image tokens go through ``vision_norm`` and ``vision``,
    text tokens through ``text_norm`` and ``text``. With ``vl_ffn_hidden_size`` the layer also has VLMo's
    vision-language FFN, which takes every token of a joint image-text sequence; an image or a text alone still
    takes its own FFN."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int, eps: float, vl_ffn_hidden_size: int = 0):
        super().__init__()
        self.vision_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.vision = FeedForward(hidden_size, ffn_hidden_size)
        self.text_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.text = FeedForward(hidden_size, ffn_hidden_size)
        if vl_ffn_hidden_size:
            self.vision_language_norm = nn.LayerNorm(hidden_size, eps=eps)
            self.vision_language = FeedForward(hidden_size, vl_ffn_hidden_size)

    def forward(self, x, num_image_tokens: int):
        joint = hasattr(self, "vision_language") and 0 < num_image_tokens < x.shape[1]
        image, text = (x[:, :0], x[:, :0]) if joint else (x[:, :num_image_tokens], x[:, num_image_tokens:])
        parts = [self.vision(self.vision_norm(image)), self.text(self.text_norm(text))]
        if hasattr(self, "vision_language"):  # the FFNs a pass does not use run on no token (see EVE.forward)
            parts.insert(0, self.vision_language(self.vision_language_norm(x if joint else x[:, :0])))
        return torch.cat(parts, dim=1)


class MultiwayBlock(nn.Module):

    def __init__(self, config: EVEConfig, drop_path: float, use_moe: bool, placement: ExpertPlacement,
                 init_seed: int = None, use_vl_ffn: bool = False):
        super().__init__()
        width = config.hidden_size
        self.norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.attn = Attention(width, config.num_heads)
        if use_moe:  # one norm for all tokens before the MoE FFN; a multiway FFN has a norm per modality
            self.norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
            self.ffn = ModalityAwareMoE(width, lambda: FeedForward(width, config.ffn_hidden_size), placement,
                                        k=config.top_k, capacity_factor=config.capacity_factor,
                                        eval_capacity_factor=config.eval_capacity_factor,
                                        min_capacity=config.min_capacity, init_std=config.init_std,
                                        routing_embedding_to_experts=config.routing_embedding_to_experts,
                                        modality_aware=config.modality_aware_routing, init_seed=init_seed)
        else:
            self.ffn = MultiwayFFN(width, config.ffn_hidden_size, config.layer_norm_eps,
                                   vl_ffn_hidden_size=config.vl_ffn_width if use_vl_ffn else 0)
        self.gamma1 = nn.Parameter(torch.full((width, ), config.layer_scale_init))
        self.gamma2 = nn.Parameter(torch.full((width, ), config.layer_scale_init))
        self.drop_path = DropPath(drop_path)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, ModalityAwareMoE)

    def forward(self, x, attn_mask, modality_ids, num_image_tokens: int):
        """Returns the block output and its auxiliary MoE loss (zero for a multiway block)."""
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x), attn_mask))
        if self.is_moe:
            h, aux_loss = self.ffn(self.norm2(x), modality_ids)
        else:
            h, aux_loss = self.ffn(x, num_image_tokens), x.new_zeros(())
        return x + self.drop_path(self.gamma2 * h), aux_loss


class EVE(nn.Module):
    """The unified encoder. ``placement`` says which experts this process holds (default: all of them).
    Initial weights (eve_ds/model/init.py) come from one draw of the global RNG."""
    normal_init_parameters = ("image_cls", "image_pos", "vision_mask_embed", "text_pos", "modality_type_embed")

    def __init__(self, config: EVEConfig, placement: ExpertPlacement = None):
        super().__init__()
        placement = placement or ExpertPlacement(config.num_experts)
        if placement.num_experts != config.num_experts:
            raise ValueError(f"the placement is of {placement.num_experts} experts, the model has {config.num_experts}")
        generator = seeded_generator(fresh_seed())
        self.config = config
        width = config.hidden_size
        self.patch_embed = nn.Conv2d(config.in_channels, width, config.patch_size, stride=config.patch_size)
        self.image_cls = nn.Parameter(torch.zeros(1, 1, width))
        self.image_pos = nn.Parameter(torch.zeros(1, config.num_image_tokens, width))
        self.vision_mask_embed = nn.Parameter(torch.zeros(1, 1, width))
        self.token_embed = nn.Embedding(config.vocab_size, width)
        self.token_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.text_pos = nn.Parameter(torch.zeros(1, config.max_text_len, width))
        self.modality_type_embed = nn.Parameter(torch.zeros(2, width))
        self.embed_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)  # over the joint sequence
        drop_rates = [config.drop_path_rate * i / max(config.num_layers - 1, 1) for i in range(config.num_layers)]
        self.blocks = nn.ModuleList(
            MultiwayBlock(config, drop_rates[i], use_moe=i in config.moe_layers, placement=placement,
                          init_seed=fresh_seed(generator) if i in config.moe_layers else None,
                          use_vl_ffn=i in config.vl_ffn_layers)
            for i in range(config.num_layers))
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.activation_checkpointing = False
        # MoE layers initialise themselves: how many experts live here depends on the expert-parallel size, and the
        # draws for the rest of the model must not.
        in_moe_layers = {id(module) for moe in self.moe_layers() for module in moe.modules()}
        init_modules_((module for module in self.modules() if id(module) not in in_moe_layers), config.init_std,
                      generator)
        if config.position_init == "sincos" and not self.image_pos.is_meta:
            with whole(self), torch.no_grad():
                self.image_pos[0, 1:].copy_(sincos_positions(config.image_size // config.patch_size, width))
                self.text_pos[0].copy_(sincos_table(range(config.max_text_len), width))

    def embed_image(self, images, image_mask=None):
        """[B, C, H, W] -> [B, num_image_tokens, width]: [CLS_img] and patches, with positions and type."""
        patches = self.patch_embed(images.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)
        if image_mask is not None:  # BEiT-style: masked patches stay in the sequence as a learned embedding
            patches = torch.where(image_mask.unsqueeze(-1), self.vision_mask_embed.to(patches.dtype), patches)
        image = torch.cat([self.image_cls.expand(patches.shape[0], -1, -1), patches], dim=1) + self.image_pos
        return image + self.modality_type_embed[VISION]

    def embed_text(self, text_ids):
        """[B, L] -> [B, L, width]: layer-normed token embeddings, with positions and type."""
        text = self.token_norm(self.token_embed(text_ids)) + self.text_pos[:, :text_ids.shape[1]]
        return text + self.modality_type_embed[TEXT]

    def forward(self, images=None, text_ids=None, text_padding_mask=None, image_mask=None, final_norm=True):
        """Encode an image-text batch, or either part alone.

        images: [B, C, H, W]; text_ids: [B, L]; text_padding_mask: [B, L], True for real tokens;
        image_mask: optional [B, num_patches], True where a patch is masked.
        Returns hidden states [B, num_image_tokens + L, width] (the parts given, image first; through the final
        LayerNorm unless ``final_norm`` is False) and the auxiliary MoE loss: the mean over MoE layers of each
        layer's load-balancing loss, as the authors reduce it (so its weight does not grow with the number of
        MoE layers). Every way into the encoder runs through here: ZeRO-3 gathers the encoder's own parameters
        (positions, [CLS], type embeddings) in this module's forward only.
        """
        image = self.embed_image(images, image_mask) if images is not None else None
        text = self.embed_text(text_ids) if text_ids is not None else None
        if image is None and text is None:
            raise ValueError("nothing to encode: give images, text_ids or both")
        parts = [part for part in (image, text) if part is not None]
        x = self.embed_norm(torch.cat(parts, dim=1))
        # A pass of one modality still puts the other's embeddings in the graph, computed on no sample, so that they
        # get a gradient of zeros: ZeRO-3 adds a micro-batch's gradients to what its buffers hold where a parameter
        # had none in the step's first micro-batch, and applies the last step's where it had none in the whole step.
        if image is None:
            size = self.config.image_size
            nothing = self.embed_image(x.new_zeros(0, self.config.in_channels, size, size),
                                       torch.zeros(0, self.config.num_patches, dtype=torch.bool, device=x.device))
            x = x + 0.0 * nothing.sum()
        if text is None:
            x = x + 0.0 * self.embed_text(torch.zeros(0, 1, dtype=torch.long, device=x.device)).sum()
        batch, num_image_tokens = x.shape[0], image.shape[1] if image is not None else 0
        attn_mask = None
        if text is not None:
            keep = torch.cat([text_padding_mask.new_ones(batch, num_image_tokens), text_padding_mask], 1)
            attn_mask = keep[:, None, None, :]
        modality_ids = torch.cat([torch.full((num_image_tokens, ), VISION, device=x.device),
                                  torch.full((x.shape[1] - num_image_tokens, ), TEXT, device=x.device)])
        modality_ids = modality_ids.expand(batch, -1)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            if self.activation_checkpointing and self.training:
                # Non-reentrant checkpointing restores the RNG state for the recomputation, so the gate's
                # sampled second expert (and drop path) repeat exactly; the aux loss returned here is the
                # first pass's, so it is counted once.
                x, block_aux = torch.utils.checkpoint.checkpoint(block, x, attn_mask, modality_ids, num_image_tokens,
                                                                 use_reentrant=False)
            else:
                x, block_aux = block(x, attn_mask, modality_ids, num_image_tokens)
            aux_loss = aux_loss + block_aux.float()
        aux_loss = aux_loss / max(len(self.config.moe_layers), 1)
        return (self.norm(x) if final_norm else x), aux_loss

    def encode_image(self, images, image_mask=None, final_norm=True):
        """An image alone (the authors' ``mode='vision'``, the retrieval dual encoder's image side): every
        token takes the vision FFNs and the vision routing embedding."""
        return self(images, image_mask=image_mask, final_norm=final_norm)

    def encode_text(self, text_ids, text_padding_mask, final_norm=True):
        """A text alone (the authors' ``mode='text'``): every token takes the text FFNs and the text routing
        embedding."""
        return self(text_ids=text_ids, text_padding_mask=text_padding_mask, final_norm=final_norm)

    @classmethod
    def from_pretrained(cls, path, image_size: int = None, max_text_len: int = None) -> "EVE":
        """The encoder from a consolidated checkpoint folder (tools/consolidate.py); the pre-training heads
        in it are left out. Every expert is local (expert-parallel size 1). ``image_size`` and
        ``max_text_len`` load the weights into a model of another resolution or text length (the image
        positions are interpolated, the text positions cut)."""
        from eve_ds.checkpoint.pretrained import load_weights, open_pretrained

        weights, config = open_pretrained(path, image_size, max_text_len)
        encoder_weights = weights.renamed({key.removeprefix("encoder."): key for key in weights
                                           if key.startswith("encoder.")})
        return load_weights(cls(config), encoder_weights, path)

    def moe_layers(self):
        return [block.ffn for block in self.blocks if block.is_moe]
