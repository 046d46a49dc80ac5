"""Whisper in PyTorch, readable top to bottom: an encoder over the log-mel spectrogram and a decoder over tokens that
attends to it.

Encoder: two 1-D convolutions (the second with stride 2, so 3000 mel frames become 1500 positions), GELU after each,
plus fixed sinusoidal position embeddings (stored as a weight), then pre-norm transformer layers and a final
LayerNorm. Decoder: token + learned position embeddings, pre-norm layers of causal self-attention (with a KV cache),
cross-attention over the encoder output, an MLP; a final LayerNorm and the LM head tied to the token embedding.

The cross-attention keys and values depend only on the audio, so they are computed once per 30 s window
(``cross_key_values``) and handed to every decode step: the exporter's encoder graph returns them, the decoder graph
takes them. Parameter names are kiln's own (``decoder.layers.0.cross.k``); ``weights.py`` maps them.

Shapes: B batch, F mel bins, N mel frames, E encoder positions (N / 2), T new tokens, P cached tokens, S = P + T,
C hidden, H heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.errors import InputError
from kiln.graphs.attention import attention, cached_attention
from kiln.graphs.checkpoint import SavePretrainedMixin
from kiln.graphs.llama.model_torch import decoder_mask  # causal + padding mask, all-masked rows fixed
from kiln.graphs.vocab import TokenEmbeddingsMixin
from kiln.graphs.whisper.config import WhisperConfig

# Copied from graphs.vit.model_torch.ACT (the activations Whisper's config may name)
ACT = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class Attention(nn.Module):
    """Multi-head attention with Whisper's projections: q, v and o with a bias, k without one."""

    def __init__(self, C: int, H: int, attn_impl: str):
        super().__init__()
        self.H, self.D, self.attn_impl = H, C // H, attn_impl
        self.scale = self.D ** -0.5
        self.q = nn.Linear(C, C)
        self.k = nn.Linear(C, C, bias=False)
        self.v = nn.Linear(C, C)
        self.o = nn.Linear(C, C)

    def heads(self, x):  # (B, T, C) -> (B, H, T, D)
        B, T, _ = x.shape
        return x.view(B, T, self.H, self.D).transpose(1, 2)

    def key_values(self, x):
        return self.heads(self.k(x)), self.heads(self.v(x))

    def merge(self, y):  # (B, H, T, D) -> (B, T, C), through the output projection
        B, H, T, D = y.shape
        return self.o(y.transpose(1, 2).reshape(B, T, H * D))

    def forward(self, x, return_probs=False):
        """Self-attention over all of ``x`` (the encoder: no mask)."""
        k, v = self.key_values(x)
        y, probs = attention(self.heads(self.q(x)), k, v, scale=self.scale, impl=self.attn_impl,
                             return_probs=return_probs)
        return self.merge(y), probs

    def cached(self, x, mask, past=None, return_probs=False):
        """Causal self-attention of the decoder; ``mask`` (B, 1, T, S) has causality folded in. Returns the output,
        the presents (past + new keys/values) and the probabilities when asked."""
        q, (k, v) = self.heads(self.q(x)), self.key_values(x)
        y, present, probs = cached_attention(q, k, v, mask, past, scale=self.scale, impl=self.attn_impl,
                                             return_probs=return_probs)
        return self.merge(y), tuple(present), probs

    def cross(self, x, key_values, return_probs=False, heads=()):
        """Attention from the decoder's tokens to the encoder output, whose keys/values (B, H, E, D) are given.
        ``heads``: also the probabilities of these heads (B, len(heads), T, E) (the alignment heads word timestamps
        read): the fused node returns all heads' probabilities then (its ``qk_matmul_output``; a mask that keeps
        every position selects that form), which costs a decode step next to nothing, where the same math in a
        branch of its own beside the node made tiny.en's steps 1.75x slower in onnxruntime."""
        q = self.heads(self.q(x))
        mask = None
        if heads:
            B, _, T, _ = q.shape
            mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device).expand(B, 1, T, key_values[0].shape[2])
        y, probs = attention(q, *key_values, mask=mask, scale=self.scale, impl=self.attn_impl,
                             return_probs=return_probs or bool(heads))
        picked = probs[:, list(heads)] if heads else None
        return self.merge(y), (probs if return_probs else None), picked


class MLP(nn.Module):
    def __init__(self, C: int, inner: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(C, inner)
        self.fc2 = nn.Linear(inner, C)
        self.act = ACT[activation]

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    """x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: WhisperConfig, attn_impl: str):
        super().__init__()
        C = config.d_model
        self.attn_norm = nn.LayerNorm(C)
        self.attn = Attention(C, config.encoder_attention_heads, attn_impl)
        self.mlp_norm = nn.LayerNorm(C)
        self.mlp = MLP(C, config.encoder_ffn_dim, config.activation_function)

    def forward(self, x, return_probs=False):
        a, probs = self.attn(self.attn_norm(x), return_probs)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), probs


class DecoderLayer(nn.Module):
    """x + self_attn(ln(x)), then x + cross_attn(ln(x), audio), then x + mlp(ln(x))."""

    def __init__(self, config: WhisperConfig, attn_impl: str):
        super().__init__()
        C = config.d_model
        self.attn_norm = nn.LayerNorm(C)
        self.attn = Attention(C, config.decoder_attention_heads, attn_impl)
        self.cross_norm = nn.LayerNorm(C)
        self.cross = Attention(C, config.decoder_attention_heads, attn_impl)
        self.mlp_norm = nn.LayerNorm(C)
        self.mlp = MLP(C, config.decoder_ffn_dim, config.activation_function)

    def forward(self, x, mask, cross_key_values, past=None, return_probs=False, heads=()):
        a, present, probs = self.attn.cached(self.attn_norm(x), mask, past, return_probs)
        x = x + a
        c, cross_probs, picked = self.cross.cross(self.cross_norm(x), cross_key_values, return_probs, heads)
        x = x + c
        return x + self.mlp(self.mlp_norm(x)), present, probs, cross_probs, picked


class WhisperEncoder(nn.Module):
    def __init__(self, config: WhisperConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = config
        C = config.d_model
        self.conv1 = nn.Conv1d(config.num_mel_bins, C, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(C, C, kernel_size=3, stride=2, padding=1)
        self.pos_embed = nn.Embedding(config.max_source_positions, C)  # sinusoids, stored in the checkpoint
        self.layers = nn.ModuleList(EncoderLayer(config, attn_impl) for _ in range(config.encoder_layers))
        self.norm = nn.LayerNorm(C)

    def forward(self, input_features, output_hidden_states=False, output_attentions=False) -> dict:
        """input_features (B, F, N) -> ``last_hidden_state`` (B, E, C) (+ ``hidden_states``, ``attentions``)."""
        config = self.config
        if input_features.dim() != 3 or tuple(input_features.shape[1:]) != (config.num_mel_bins, config.input_frames):
            raise InputError(f"Whisper takes input_features of shape (batch, {config.num_mel_bins} mel bins, "
                             f"{config.input_frames} frames), got {tuple(input_features.shape)}: pad or cut the "
                             f"audio to {config.input_frames // 100} s with the feature extractor.")
        x = F.gelu(self.conv1(input_features))  # (B, C, N)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, E, C)
        x = x + self.pos_embed.weight  # (B, E, C)
        hidden_states, attentions = [x], []
        for layer in self.layers:
            x, probs = layer(x, output_attentions)
            hidden_states.append(x)
            attentions.append(probs)
        x = self.norm(x)
        hidden_states[-1] = x  # transformers reports the final hidden state after the last LayerNorm
        out = {"last_hidden_state": x}
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        if output_attentions:
            out["attentions"] = tuple(attentions)
        return out


class WhisperDecoder(nn.Module):
    def __init__(self, config: WhisperConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = nn.Embedding(config.max_target_positions, config.d_model)
        self.layers = nn.ModuleList(DecoderLayer(config, attn_impl) for _ in range(config.decoder_layers))
        self.norm = nn.LayerNorm(config.d_model)

    def cross_key_values(self, encoder_hidden_states) -> tuple:
        """Per layer (key, value), each (B, H, E, D): what every decode step of one audio window attends to."""
        return tuple(layer.cross.key_values(encoder_hidden_states) for layer in self.layers)

    def forward(self, input_ids, cross_key_values, attention_mask=None, position_ids=None, past_key_values=None,
                output_hidden_states=False, output_attentions=False, alignment_heads=()) -> dict:
        """input_ids (B, T) -> ``last_hidden_state`` (B, T, C) and ``present_key_values`` (per layer (key, value),
        each (B, H, S, D)); ``attention_mask`` (B, S) covers the past and new tokens. ``alignment_heads`` ((layer,
        head) pairs): also ``alignment_weights`` (B, len(alignment_heads), T, E), those heads' cross-attention
        probabilities in that order."""
        B, T = input_ids.shape
        P = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if P + T > self.config.max_target_positions:
            raise InputError(f"Whisper's decoder has {self.config.max_target_positions} positions; {P + T} tokens "
                             "(prompt, cache and new) do not fit. Use fewer new tokens or a shorter prompt.")
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.long, device=input_ids.device)
        if position_ids is None:  # as transformers: positions continue from the cache
            position_ids = torch.arange(P, P + T, device=input_ids.device)[None].expand(B, T)
        mask = decoder_mask(attention_mask, T)  # (B, 1, T, S)
        x = self.embed(input_ids) + self.pos_embed(position_ids)  # (B, T, C)
        hidden_states, attentions, cross_attentions, presents, picked = [x], [], [], [], {}
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values is not None else None
            heads = sorted({h for l, h in alignment_heads if l == i})
            x, present, probs, cross_probs, weights = layer(x, mask, cross_key_values[i], past, output_attentions,
                                                            heads)
            picked.update({(i, h): weights[:, n] for n, h in enumerate(heads)})
            hidden_states.append(x)
            attentions.append(probs)
            cross_attentions.append(cross_probs)
            presents.append(present)
        x = self.norm(x)
        hidden_states[-1] = x
        out = {"last_hidden_state": x, "present_key_values": tuple(presents)}
        if alignment_heads:
            out["alignment_weights"] = torch.stack([picked[tuple(pair)] for pair in alignment_heads], dim=1)
        if output_hidden_states:
            out["hidden_states"] = tuple(hidden_states)
        if output_attentions:
            out["attentions"], out["cross_attentions"] = tuple(attentions), tuple(cross_attentions)
        return out


class WhisperForConditionalGeneration(SavePretrainedMixin, TokenEmbeddingsMixin, nn.Module):
    """Speech recognition: ``encode`` once per 30 s window, then ``forward`` per decode step over the cache.

    ``forward(input_features=..., decoder_input_ids=...)`` runs both, as transformers' model does; with
    ``encoder_outputs`` (what ``encode`` returned) it skips the encoder. Returns ``logits`` (B, T, V),
    ``present_key_values``, ``cross_key_values``, ``encoder_last_hidden_state``; with ``output_hidden_states`` /
    ``output_attentions`` also transformers' ``encoder_hidden_states``, ``decoder_hidden_states``,
    ``encoder_attentions``, ``decoder_attentions`` and ``cross_attentions``."""

    task = "automatic-speech-recognition"
    token_tables = {"input": "decoder.embed", "output": "proj_out"}  # proj_out None: tied to the embedding

    def __init__(self, config: WhisperConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = config
        self.encoder = WhisperEncoder(config, attn_impl)
        self.decoder = WhisperDecoder(config, attn_impl)
        self.proj_out = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.alignment_heads: tuple = ()  # (layer, head) pairs, from generation_config.json (use_generation_config)

    def use_generation_config(self, raw: dict) -> None:
        """Take the generation config's ``alignment_heads``: the cross-attention heads whose probabilities follow the
        audio, from which word timestamps are timed (``output_alignment``; the exported decoder graph returns them as
        ``alignment_weights``). Pairs out of range are refused."""
        heads = raw.get("alignment_heads") or ()
        config = self.config
        if not isinstance(heads, (list, tuple)) or not all(
                isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(i, int) and not isinstance(i, bool)
                                                                     for i in h) for h in heads):
            raise InputError(f"generation_config.json 'alignment_heads' must be [layer, head] pairs, got {heads!r:.80}.")
        for layer, head in heads:
            if not (0 <= layer < config.decoder_layers and 0 <= head < config.decoder_attention_heads):
                raise InputError(f"generation_config.json 'alignment_heads' names [{layer}, {head}], but the decoder has "
                                 f"{config.decoder_layers} layers of {config.decoder_attention_heads} heads. Copy the "
                                 "file from the checkpoint the weights came from.")
        self.alignment_heads = tuple(dict.fromkeys(tuple(h) for h in heads))

    def encode(self, input_features, output_hidden_states=False, output_attentions=False) -> dict:
        """The audio side: ``encoder_last_hidden_state`` (B, E, C) and each decoder layer's cross-attention
        ``cross_key_values``."""
        enc = self.encoder(input_features, output_hidden_states, output_attentions)
        out = {"encoder_last_hidden_state": enc["last_hidden_state"],
               "cross_key_values": self.decoder.cross_key_values(enc["last_hidden_state"])}
        if output_hidden_states:
            out["encoder_hidden_states"] = enc["hidden_states"]
        if output_attentions:
            out["encoder_attentions"] = enc["attentions"]
        return out

    def forward(self, input_features=None, decoder_input_ids=None, *, encoder_outputs=None,
                decoder_attention_mask=None, decoder_position_ids=None, past_key_values=None,
                output_hidden_states=False, output_attentions=False, output_alignment=False) -> dict:
        if decoder_input_ids is None:
            raise InputError("Whisper's forward needs decoder_input_ids (start with "
                             f"decoder_start_token_id = {self.config.decoder_start_token_id}).")
        if encoder_outputs is None:
            if input_features is None:
                raise InputError("Whisper's forward needs input_features, or encoder_outputs from model.encode().")
            encoder_outputs = self.encode(input_features, output_hidden_states, output_attentions)
        dec = self.decoder(decoder_input_ids, encoder_outputs["cross_key_values"], decoder_attention_mask,
                           decoder_position_ids, past_key_values, output_hidden_states, output_attentions,
                           self.alignment_heads if output_alignment else ())
        head = self.decoder.embed.weight if self.proj_out is None else self.proj_out.weight
        out = {"logits": F.linear(dec["last_hidden_state"], head), "present_key_values": dec["present_key_values"],
               **encoder_outputs}
        if output_hidden_states:
            out["decoder_hidden_states"] = dec["hidden_states"]
        if output_attentions:
            out["decoder_attentions"], out["cross_attentions"] = dec["attentions"], dec["cross_attentions"]
        if "alignment_weights" in dec:
            out["alignment_weights"] = dec["alignment_weights"]
        return out

    def export_graphs(self) -> dict:
        """The artifact's two graphs as modules: ``decoder`` (the main one, run per step) and ``encoder``."""
        return {"decoder": DecoderGraph(self), "encoder": EncoderGraph(self)}


class EncoderGraph(nn.Module):
    """The encoder graph: ``input_features`` -> ``encoder_last_hidden_state`` and ``cross_key_values``."""

    def __init__(self, model: WhisperForConditionalGeneration):
        super().__init__()
        self.model, self.config = model, model.config
        self.attention_nodes = model.config.encoder_layers  # one fused node per encoder layer

    def forward(self, input_features):
        return self.model.encode(input_features)


class DecoderGraph(nn.Module):
    """The decoder graph for prefill and decode: tokens, their mask and positions, the self-attention cache and the
    cross-attention keys/values -> ``logits`` and the presents, and with alignment heads their ``alignment_weights``
    (an output decode steps do not ask for; the runtime reads it once per window for word timestamps)."""

    def __init__(self, model: WhisperForConditionalGeneration):
        super().__init__()
        self.model, self.config = model, model.config
        self.attention_nodes = 2 * model.config.decoder_layers  # self- and cross-attention per layer

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, cross_key_values):
        out = self.model(decoder_input_ids=input_ids, encoder_outputs={"cross_key_values": cross_key_values},
                         decoder_attention_mask=attention_mask, decoder_position_ids=position_ids,
                         past_key_values=past_key_values, output_alignment=bool(self.model.alignment_heads))
        keep = ("logits", "present_key_values", "alignment_weights")
        return {name: out[name] for name in keep if name in out}
