"""The Qwen2 decoder (the LLM of Long-VITA, Qwen2.5 unchanged), readable in one file.

Owns the decoder stack: token embedding, pre-norm decoder layers (grouped-query attention with
q/k/v bias and RoPE, SwiGLU MLP) and the final RMSNorm. Module names equal the Qwen2 state-dict
keys without the `model.` prefix, so a Qwen2.5 / Long-VITA checkpoint loads by name.

Does not own: the LM head (logits are computed only for the rows that need them, elsewhere),
the vision encoder and the splicing of visual features (it takes `inputs_embeds`), how tokens
see each other (the attention strategy handed to `forward`: causal, packed samples, a KV cache,
ring attention), the attention kernels (`ops.attention`), and anything distributed.

The model holds parameters only, no buffers: it can be built under `torch.device("meta")` and
filled with `load_state_dict(..., assign=True)`. RoPE tables are computed from the positions of
each forward, so every token may carry any absolute position.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from longvita.config import LongVITAConfig
from longvita.ops.attention import attention
from longvita.ops.linear import decode_linear
from longvita.ops.rope import apply_rope, rope_cos_sin

MLP_ROW_BLOCK = 1024
"""Rows per MLP call without autograd (see `Qwen2MLP`): bounds a prefill chunk's widest
tensors; large enough that the matmuls run at full speed."""

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""The attention strategy of a forward: (q [B, Hq, S, D], k, v [B, Hkv, S, D], layer_idx) ->
[B, Hq, S, D]. Plain causal attention by default; packed samples (`ops.attention`), a KV cache
(`model.kv_cache`), ring attention over context-parallel shards (`parallel`) are others. The
model hands every layer's q/k/v (RoPE applied) to it and knows nothing else of the layout."""
SUFFIX_QUERIES = "takes_query_suffix"
"""An attention strategy with this attribute true also takes q of only the last row of the
new tokens, or of none (q [B, Hq, 1 or 0, D], k and v of every new token): keys and values are
stored for all, the rows given attend as they would among all (`Qwen2Model.forward`'s
keep_last)."""


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int
) -> torch.Tensor:
    """The default strategy: causal attention over exactly the tokens of this forward."""
    return attention(q, k, v, causal=True)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2 RMSNorm: normalize in float32, cast back to the input dtype, then scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}"


class Qwen2Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE; K/V heads are never repeated."""

    def __init__(self, config: LongVITAConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = decode_linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = decode_linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = decode_linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = decode_linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_fn: AttentionFn = causal_attention,
        keep_last: int | None = None,
    ) -> torch.Tensor:
        """x [batch, seq, hidden], cos/sin [batch, seq, head_dim] -> [batch, seq, hidden].

        keep_last: only the last `keep_last` rows' outputs are wanted (1 or 0; None: all): the
        keys and values are computed for every row, the queries only for those rows, and
        `attention_fn` takes such a suffix of queries (`SUFFIX_QUERIES`). Returns
        [batch, keep_last, hidden] then."""
        batch, seq, _ = x.shape
        rows = seq if keep_last is None else keep_last
        queries = x[:, seq - rows :]
        q = self.q_proj(queries).view(batch, rows, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # q: [batch, heads, rows, head_dim]; k, v: [batch, kv_heads, seq, head_dim]
        q = apply_rope(q, cos[:, seq - rows :], sin[:, seq - rows :])
        k = apply_rope(k, cos, sin)
        out = attention_fn(q, k, v, self.layer_idx)  # [batch, heads, rows, head_dim]
        out = out.transpose(1, 2).reshape(batch, rows, self.num_heads * self.head_dim)
        return self.o_proj(out)  # [batch, rows, hidden]


class Qwen2MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, config: LongVITAConfig) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = decode_linear(hidden, inner, bias=False)
        self.up_proj = decode_linear(hidden, inner, bias=False)
        self.down_proj = decode_linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():  # training: autograd keeps the [rows, inner] tensors anyway
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self._forward_in_row_blocks(x)

    def _forward_in_row_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: the same per-row function, `MLP_ROW_BLOCK` rows at a time, in place.

        The widest tensors of a prefill chunk are the MLP's [rows, inner] ones (three of them
        live at once, eager); here two of [MLP_ROW_BLOCK, inner] are, whatever the chunk size.
        """
        rows = x.reshape(-1, x.shape[-1])  # [rows, hidden]
        out = rows.new_empty(rows.shape[0], self.down_proj.out_features)  # [rows, hidden]
        for start in range(0, rows.shape[0], MLP_ROW_BLOCK):
            block = rows[start : start + MLP_ROW_BLOCK]
            inner = F.silu(self.gate_proj(block), inplace=True).mul_(self.up_proj(block))
            out[start : start + MLP_ROW_BLOCK] = self.down_proj(inner)
        return out.view(*x.shape[:-1], out.shape[-1])


class Qwen2DecoderLayer(nn.Module):
    """Pre-norm block: x += attn(norm(x)); x += mlp(norm(x))."""

    def __init__(self, config: LongVITAConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention_fn: AttentionFn = causal_attention,
        keep_last: int | None = None,
    ) -> torch.Tensor:
        """[batch, seq, hidden] -> the same, or its last `keep_last` rows only (see
        `Qwen2Attention.forward`)."""
        attended = self.self_attn(self.input_layernorm(x), cos, sin, attention_fn, keep_last)
        x = x[:, x.shape[1] - attended.shape[1] :] + attended  # [b, rows, h]
        return x + self.mlp(self.post_attention_layernorm(x))  # [batch, rows, hidden]


class Qwen2Model(nn.Module):
    """Embedding, decoder layers and final norm; hidden states out, no LM head."""

    def __init__(self, config: LongVITAConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen2DecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        attention_fn: AttentionFn | None = None,
        keep_last: int | None = None,
    ) -> torch.Tensor:
        """Decode `inputs_embeds` [batch, seq, hidden] at absolute `position_ids` [batch, seq].

        `attention_fn` is the attention strategy (default: causal over these tokens); with a
        `KVCache` the new tokens attend to the cached ones and are written into it (the caller
        advances the cache after the forward). Returns the final-norm hidden states
        [batch, seq, hidden].

        keep_last (1 or 0, with an `attention_fn` that takes `SUFFIX_QUERIES`): only the last
        `keep_last` rows are wanted (a prompt chunk's last token, or none); the last layer then
        computes its keys and values for every row and nothing else for the others, 1 /
        num_layers of the work. Returns [batch, keep_last, hidden].
        """
        if keep_last is not None and not getattr(attention_fn, SUFFIX_QUERIES, False):
            raise ValueError(f"keep_last needs an attention_fn with {SUFFIX_QUERIES}")
        attention_fn = attention_fn or causal_attention
        if position_ids.shape != inputs_embeds.shape[:2]:
            raise ValueError(
                f"position_ids {tuple(position_ids.shape)} must be [batch, seq] of "
                f"inputs_embeds {tuple(inputs_embeds.shape)}"
            )
        cos, sin = rope_cos_sin(
            position_ids, self.config.head_dim, self.config.rope_theta, inputs_embeds.dtype
        )  # [batch, seq, head_dim] each
        x = inputs_embeds
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin, attention_fn, keep_last if index == last else None)
        return self.norm(x)  # [batch, seq or keep_last, hidden]

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init for tests and demos: N(0, std) weights, zero biases, unit norms."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
