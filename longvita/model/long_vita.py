"""LongVITA: InternViT + projector + Qwen2 decoder, with the logits-masked LM head.

Owns the splice (projected tile features overwrite the placeholder embeddings, tile by tile in
sequence order) and the LM head that projects only the hidden rows asked for (which tiles a set
of positions needs is `ops.sequence`). Module names equal the official state-dict keys
(`model.embed_tokens`, `model.vision_model.*`, `model.vision_projection.*`, `lm_head`), so a
checkpoint loads with a plain load_state_dict. Knows nothing of tokenizers, sampling or
distributed state.
"""

from __future__ import annotations

import torch
from torch import nn

from longvita.config import LongVITAConfig
from longvita.model.projector import VisionProjector
from longvita.model.qwen2 import SUFFIX_QUERIES, AttentionFn, Qwen2Model
from longvita.model.vision import InternVisionModel
from longvita.ops.embedding import embed
from longvita.ops.linear import decode_linear
from longvita.ops.loss import full_logits_loss, masked_lm_loss


class LongVITAModel(Qwen2Model):
    """The Qwen2 decoder plus the vision tower and projector that feed it."""

    def __init__(self, config: LongVITAConfig) -> None:
        super().__init__(config)
        self.vision_model = InternVisionModel(config.vision)
        self.vision_projection = VisionProjector(config.vision, config.hidden_size)

    def encode_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_tiles, 3, S, S] pixels -> [num_tiles, tokens_per_tile, hidden] LLM features."""
        pixel_values = pixel_values.to(self.embed_tokens.weight.dtype)
        return self.vision_projection(self.vision_model(pixel_values))

    def embed_multimodal(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        feature_index: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        keep_vision_in_graph: bool = False,
    ) -> torch.Tensor:
        """Token embeddings [batch, seq, hidden] with visual features written over placeholders.

        input_ids: [batch, seq]; visual_mask: [batch, seq] bool, True at placeholder positions;
        pixel_values: [num_tiles, 3, S, S]. The placeholders take the tiles' feature rows in
        order, or, with `feature_index` [num_slots], the rows it names of the flattened features
        [num_tiles * tokens_per_tile] (a context-parallel shard holds parts of tiles). Or, instead
        of pixels, `visual_features` [num_slots, hidden]: already projected rows, one per
        placeholder in order (chunked prefill encodes tiles as their chunk comes up).

        keep_vision_in_graph (training): without a tile, one zero tile still goes through the
        ViT and projector and is added times 0, so that every rank of a data- or
        context-parallel job runs the vision tower's collectives and gets its (zero) gradients.
        """
        embeds = embed(input_ids, self.embed_tokens.weight)  # [batch, seq, hidden]
        num_slots = 0 if visual_mask is None else int(visual_mask.sum())
        if visual_features is not None:
            if pixel_values is not None:
                raise ValueError("give pixel_values or visual_features, not both")
            if num_slots != visual_features.shape[0]:
                raise ValueError(
                    f"the prompt has {num_slots} visual placeholder tokens but visual_features "
                    f"has {visual_features.shape[0]} rows"
                )
        else:
            num_tiles = 0 if pixel_values is None else pixel_values.shape[0]
            tokens_per_tile = self.config.vision.tokens_per_tile
            num_features = (
                num_tiles * tokens_per_tile if feature_index is None else len(feature_index)
            )
            if num_slots != num_features:
                raise ValueError(
                    f"the prompt has {num_slots} visual placeholder tokens but the {num_tiles} "
                    f"tile(s) give {num_features} features ({tokens_per_tile} per tile)"
                )
        if num_slots == 0:
            return embeds + self._vision_in_graph(embeds) if keep_vision_in_graph else embeds
        if visual_features is None:
            features = self.encode_tiles(pixel_values)  # [num_tiles, tokens_per_tile, hidden]
            visual_features = features.reshape(-1, features.shape[-1])  # [num_tiles * tpt, h]
            if feature_index is not None:
                visual_features = visual_features.index_select(
                    0, feature_index.to(visual_features.device)
                )  # [num_slots, hidden]
        return embeds.masked_scatter(visual_mask[..., None], visual_features.to(embeds.dtype))

    def _vision_in_graph(self, embeds: torch.Tensor) -> torch.Tensor:
        """0 x the features of one zero tile: a scalar 0 that depends on every vision weight."""
        size = self.config.vision.image_size
        zeros = torch.zeros(1, 3, size, size, device=embeds.device, dtype=embeds.dtype)
        return 0.0 * self.encode_tiles(zeros).sum().to(embeds.dtype)


def rows_wanted(logit_positions: torch.Tensor | None, attention_fn) -> int | None:
    """How many last rows a forward needs the hidden states of, when its attention strategy
    can skip the others in the last layer (`qwen2.SUFFIX_QUERIES`): 1 for the last position
    (`logit_positions` None), 0 for none (empty); None (every row) otherwise."""
    if not getattr(attention_fn, SUFFIX_QUERIES, False):
        return None
    if logit_positions is None:
        return 1
    return 0 if logit_positions.numel() == 0 else None


class LongVITAForCausalLM(nn.Module):
    """The full model. `forward` returns logits only at the positions asked for."""

    def __init__(self, config: LongVITAConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LongVITAModel(config)
        self.lm_head = decode_linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head when the config asks for it."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        visual_features: torch.Tensor | None = None,
        attention_fn: AttentionFn | None = None,
        logit_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [batch, num_positions, vocab] for `logit_positions` (default: the last one).

        input_ids: [batch, seq]. position_ids: [batch, seq] absolute positions (default 0..seq-1;
        pass them when tokens follow a cache). pixel_values or visual_features: the visual
        placeholders' content (see `LongVITAModel.embed_multimodal`). attention_fn: the attention
        strategy (a KVCache when generating). logit_positions: [num_positions] indices into seq;
        pass `torch.arange(seq)` to get every position (a [seq, vocab] tensor: only when
        needed), an empty tensor for none (a prefill chunk that is not the last). With the last
        position or none and a KV cache, the last layer skips the other rows (`rows_wanted`).
        """
        batch, seq = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        embeds = self.model.embed_multimodal(
            input_ids, pixel_values, visual_mask, visual_features=visual_features
        )
        keep_last = rows_wanted(logit_positions, attention_fn)
        hidden = self.model(embeds, position_ids, attention_fn=attention_fn, keep_last=keep_last)
        if keep_last is not None:  # [b, keep_last, hidden]: the last row, or none
            return self.lm_head(hidden)
        return self.logits_at(hidden, logit_positions)  # hidden [b, seq, hidden]

    def loss(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        *,
        position_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        visual_mask: torch.Tensor | None = None,
        feature_index: torch.Tensor | None = None,
        attention_fn: AttentionFn | None = None,
        chunk_size: int = 4096,
        logits_masked: bool = True,
        keep_vision_in_graph: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token loss (sum, count).

        targets: [batch, seq], already shifted over the whole sequence (`ops.loss.shift_labels`)
        so that targets[p] is the label of token p+1; -100 where no loss. With logits_masked
        (the default) only the rows with a target are projected to the vocabulary, `chunk_size`
        rows at a time; without, every row is (the same value, [seq, vocab] logits in memory).
        keep_vision_in_graph: see `LongVITAModel.embed_multimodal`.
        """
        embeds = self.model.embed_multimodal(
            input_ids,
            pixel_values,
            visual_mask,
            feature_index,
            keep_vision_in_graph=keep_vision_in_graph,
        )
        hidden = self.model(embeds, position_ids, attention_fn=attention_fn)  # [b, seq, hidden]
        rows = hidden.reshape(-1, hidden.shape[-1])  # [batch * seq, hidden]
        if not logits_masked:
            return full_logits_loss(rows, self.lm_head.weight, targets.reshape(-1))
        return masked_lm_loss(rows, self.lm_head.weight, targets.reshape(-1), chunk_size=chunk_size)

    def logits_at(
        self, hidden: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Project only the rows `positions` [n] of hidden [batch, seq, hidden] -> [batch, n, V]."""
        if positions is None:
            rows = hidden[:, -1:]  # [batch, 1, hidden]
        else:
            rows = hidden.index_select(1, positions.to(hidden.device))  # [batch, n, hidden]
        return self.lm_head(rows)
