"""Decoder-only LM: Vicuna-7B/13B (HF `LlamaForCausalLM`) and Qwen2-7B (HF `Qwen2ForCausalLM`).

The two architectures differ only in numbers (GQA, RoPE theta, norm eps, vocabulary) and in the
q/k/v biases of Qwen2, so one module covers both, configured by `cfg.model.llm`. Attribute names
follow transformers (`embed_tokens`, `layers.self_attn.q_proj`, `norm`, `lm_head`) so the
conversion table in `hiwin_jax/convert/hf_llama.py` reads as a list of renames.

Numerics follow transformers' eager path: RMSNorm statistics in float32, RoPE tables built in
float32 and cast to the compute dtype, scores scaled after the q.k matmul, softmax in float32 and
the probabilities cast back before the value matmul. Logits are returned in float32.

The KV cache is a plain dict of arrays (see `LlamaModel.init_cache`), threaded through calls, so
incremental decoding is a pure function that runs under `jax.jit`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hiwin_jax.models.layers import (Linear, Precision, RMSNorm, checkpoint_name, normal_init,
                                     param, scaled, scan_layers, stack_layers)
from hiwin_jax.parallel import sharding
from hiwin_jax.parallel.sharding import constrain

Cache = dict[str, jax.Array]
# "xla": einsums, every platform. "cudnn": jax.nn.dot_product_attention's cuDNN flash kernel
# (NVIDIA GPUs). "splash": the Pallas TPU splash kernel for training and prefill without a cache
# (cached decoding uses the xla path).
ATTENTIONS = ("xla", "cudnn", "splash")
_MASKED = float(np.finfo(np.float32).min)  # finite, so fully masked (padding) rows stay NaN-free


# --- rotary position embedding ----------------------------------------------------------------

def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float,
                 dtype: Any) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, S, D] of HF `LlamaRotaryEmbedding` (rope_type "default") for positions [B, S].

  inv_freq = 1 / theta^(arange(0, D, 2) / D) and the angles are formed in float32 exactly as
  transformers does; the tables are then cast to the compute dtype.
  """
  exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
  inv_freq = np.float32(1.0) / np.power(np.float32(theta), exponent)
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: [B, S, N, D], cos/sin: [B, S, D] -> x*cos + rotate_half(x)*sin.

  HF `apply_rotary_pos_emb` (rotate-half convention, not the interleaved one).
  """
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# --- attention kernels --------------------------------------------------------------------------

def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                  precision: Precision) -> jax.Array:
  """Grouped-query attention, HF `eager_attention_forward` semantics, without repeating k/v.

  q: [B, S, H, D], k/v: [B, KVH, T, D] (the KV cache's layout: a decode step reads it without a
  transpose), mask: [B, S, T] bool (True = may attend) -> [B, S, H, D].
  Query head h uses kv head h // (H / KVH), as `repeat_kv` does.
  """
  b, s, h, d = q.shape
  kvh = k.shape[1]
  qg = q.reshape(b, s, kvh, h // kvh, d)
  scores = jnp.einsum("bskgd,bktd->bkgst", qg, k, precision=precision.matmul,
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgst,bktd->bskgd", probs, v, precision=precision.matmul)
  return out.reshape(b, s, h, d)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """cuDNN flash attention via `jax.nn.dot_product_attention(implementation="cudnn")`.

  q: [B, S, H, D], k/v: [B, T, KVH, D] in bf16/fp16. `mask` None means plain causal attention
  (cuDNN's own causal mask, no bias tensor); otherwise mask [B, S, T] is passed as a boolean mask,
  which JAX turns into an additive bias [B, 1, S, T] (padding and cached decoding pay for it).
  """
  if jax.default_backend() != "gpu":
    raise ValueError(f"llm attention='cudnn' needs an NVIDIA GPU, but the JAX backend is "
                     f"{jax.default_backend()!r}; set model.llm.attention='xla'")
  if mask is None:
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn")


_SPLASH_BLOCKS = (512, 256, 128)


def _splash_kernel(seq: int, group: int, interpret: bool):
  """Splash MQA kernel for `group` query heads sharing one k/v head, causal over `seq` tokens."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  block = next(b for b in _SPLASH_BLOCKS if seq % b == 0)
  sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  mask = sa.MultiHeadMask([sa.CausalMask((seq, seq))] * group)
  return sa.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash_local(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """One shard: q [b, S, KVH, G, D] (already scaled), k/v [b, KVH, S, D], segment_ids [b, S]
  -> [b, S, KVH, G, D]. S is padded to a multiple of 128 (padding is segment 0)."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  b, s, kvh, g, d = q.shape
  sp = -(-s // _SPLASH_BLOCKS[-1]) * _SPLASH_BLOCKS[-1]
  if sp != s:
    q = jnp.pad(q, ((0, 0), (0, sp - s), (0, 0), (0, 0), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, sp - s), (0, 0))) for x in (k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, sp - s)))
  qh = q.transpose(0, 2, 3, 1, 4)                                           # [b, KVH, G, S, D]

  def run(interpret):
    kernel = _splash_kernel(sp, g, interpret)
    per_head = jax.vmap(lambda q1, k1, v1, seg: kernel(q1, k1, v1, segment_ids=seg),
                        in_axes=(0, 0, 0, None))
    return lambda qh, k, v, seg: jax.vmap(per_head)(qh, k, v, sa.SegmentIds(seg, seg))

  # Interpreted on the CPU only (tests, AOT checks): on a GPU, Pallas interpret mode would be a
  # silent, very slow fallback, so lowering for one fails (and LlamaModel refuses it up front).
  out = jax.lax.platform_dependent(qh, k, v, segment_ids, tpu=run(False), cpu=run(True))
  return out.transpose(0, 3, 1, 2, 4)[:, :s]


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     segment_ids: jax.Array) -> jax.Array:
  """Causal attention with the Pallas TPU splash kernel
  (`jax.experimental.pallas.ops.tpu.splash_attention`, what MaxText uses on TPU): no [S, S]
  score matrix in HBM, fully masked blocks skipped. Lowered for the CPU it runs in interpret mode
  (tests); there is no GPU lowering.

  q: [B, S, H, D], k/v: [B, KVH, S, D] (GQA: query head h uses kv head h // (H / KVH)),
  segment_ids [B, S] int32 (1 = real token, 0 = padding: padding keys are never attended; rows
  of padding queries are unspecified) -> [B, S, H, D] in q's dtype. q is scaled by D^-0.5 before
  the q.k product (the kernel takes scaled queries), so bf16 rounds differently from
  `xla_attention`, which scales the float32 scores. Under a mesh with logical rules the kernel
  runs in a shard_map over the `batch` and `kv_heads` mesh axes (Mosaic kernels are not
  partitioned by XLA).
  """
  b, s, h, d = q.shape
  kvh = k.shape[1]
  qg = scaled(q, d ** -0.5).reshape(b, s, kvh, h // kvh, d)
  segment_ids = segment_ids.astype(jnp.int32)
  batch_axes = sharding.mesh_axes("batch", b)
  head_axes = sharding.mesh_axes("kv_heads", kvh)
  if batch_axes or head_axes:
    P = jax.sharding.PartitionSpec
    bx, hx = batch_axes or None, head_axes or None
    out = jax.shard_map(
        _splash_local, mesh=jax.sharding.get_abstract_mesh(),
        in_specs=(P(bx, None, hx), P(bx, hx), P(bx, hx), P(bx)), out_specs=P(bx, None, hx),
        check_vma=False)(qg, k, v, segment_ids)
  else:
    out = _splash_local(qg, k, v, segment_ids)
  return out.reshape(b, s, h, d)


# --- modules ----------------------------------------------------------------------------------

class Embedding(nnx.Module):
  """`torch.nn.Embedding(vocab, E)`: the table [vocab, E] with logical axes ('vocab', 'embed')."""

  def __init__(self, vocab_size: int, dim: int, *, precision: Precision, rngs: nnx.Rngs):
    self.precision = precision
    self.embedding = param(rngs, normal_init(), (vocab_size, dim), precision.param_dtype,
                           ("vocab", "embed"))

  def __call__(self, ids: jax.Array) -> jax.Array:
    """ids: [B, S] int -> [B, S, E] in the compute dtype."""
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.precision.dtype)


class LlamaAttention(nnx.Module):
  """HF `LlamaAttention` / `Qwen2Attention`: q/k/v projections (biased iff qkv_bias), RoPE, GQA."""

  def __init__(self, cfg, precision: Precision, *, rngs: nnx.Rngs):
    e, h, kvh, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if h % kvh:
      raise ValueError(f"num_heads {h} is not a multiple of num_kv_heads {kvh}")
    self.num_heads, self.num_kv_heads, self.head_dim = h, kvh, d
    self.attention = cfg.attention
    self.precision = precision
    lin = dict(precision=precision, rngs=rngs)
    self.q_proj = Linear(e, h * d, axes=("embed", "heads"), use_bias=cfg.qkv_bias, **lin)
    self.k_proj = Linear(e, kvh * d, axes=("embed", "kv_heads"), use_bias=cfg.qkv_bias, **lin)
    self.v_proj = Linear(e, kvh * d, axes=("embed", "kv_heads"), use_bias=cfg.qkv_bias, **lin)
    self.o_proj = Linear(h * d, e, axes=("heads", "embed"), use_bias=False, **lin)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
               causal_only: bool, kv_cache: tuple[jax.Array, jax.Array] | None,
               index: jax.Array | None):
    """x: [B, S, E], cos/sin: [B, S, D], mask: [B, S, T] -> ([B, S, E], (k, v) or None).

    Without a cache T == S. With `kv_cache` ([B, KVH, T, D] each), the S new keys/values are
    written at slots index..index+S-1 and the queries attend to the whole updated cache; the
    updated (k, v) are returned.
    """
    b, s, _ = x.shape
    q = checkpoint_name(self.q_proj(x), "query_proj").reshape(b, s, self.num_heads, self.head_dim)
    k = checkpoint_name(self.k_proj(x), "key_proj").reshape(b, s, self.num_kv_heads, self.head_dim)
    v = checkpoint_name(self.v_proj(x), "value_proj").reshape(b, s, self.num_kv_heads,
                                                              self.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                  # [B, KVH, S, D]
    new_kv = None
    if kv_cache is not None:
      k_cache, v_cache = kv_cache
      k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, index, 0))
      v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, index, 0))
      new_kv = (k_cache, v_cache)
      k, v = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
    if self.attention == "xla" or (self.attention == "splash" and kv_cache is not None):
      ctx = xla_attention(q, k, v, mask, self.precision)
    elif self.attention == "splash":
      # Without a cache the last query row of the causal mask is exactly the key validity.
      ctx = splash_attention(q, k, v, mask[:, -1, :])
    elif self.attention == "cudnn":
      # jax.nn.dot_product_attention takes [B, T, KVH, D]: without a cache the two transposes
      # cancel; with one, each decode step transposes the cache (as the xla path did before).
      ctx = cudnn_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                            None if causal_only else mask)
    else:
      raise ValueError(f"unknown llm attention {self.attention!r}; choose one of {ATTENTIONS}")
    ctx = checkpoint_name(ctx.reshape(b, s, self.num_heads * self.head_dim), "context")
    return checkpoint_name(self.o_proj(ctx), "out_proj"), new_kv


class LlamaMLP(nnx.Module):
  """HF `LlamaMLP`: down_proj(silu(gate_proj(x)) * up_proj(x)), no biases."""

  def __init__(self, cfg, precision: Precision, *, rngs: nnx.Rngs):
    e, m = cfg.hidden_size, cfg.mlp_dim
    lin = dict(use_bias=False, precision=precision, rngs=rngs)
    self.gate_proj = Linear(e, m, axes=("embed", "mlp"), **lin)
    self.up_proj = Linear(e, m, axes=("embed", "mlp"), **lin)
    self.down_proj = Linear(m, e, axes=("mlp", "embed"), **lin)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, S, E] -> [B, S, E]."""
    gate = checkpoint_name(self.gate_proj(x), "mlp_in")
    up = checkpoint_name(self.up_proj(x), "mlp_in")
    return checkpoint_name(self.down_proj(jax.nn.silu(gate) * up), "mlp_out")


class LlamaDecoderLayer(nnx.Module):
  """HF `LlamaDecoderLayer`: pre-norm attention and pre-norm MLP, each with a residual."""

  def __init__(self, cfg, precision: Precision, *, rngs: nnx.Rngs):
    norm = dict(eps=cfg.rms_norm_eps, axis_name="norm", precision=precision)
    self.input_layernorm = RMSNorm(cfg.hidden_size, **norm)
    self.self_attn = LlamaAttention(cfg, precision, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm)
    self.mlp = LlamaMLP(cfg, precision, rngs=rngs)

  def __call__(self, x: jax.Array, cos, sin, mask, causal_only, kv_cache, index):
    """x: [B, S, E] -> ([B, S, E], updated per-layer (k, v) or None); see `LlamaAttention`."""
    h, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, causal_only, kv_cache,
                               index)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, new_kv


class LlamaModel(nnx.Module):
  """HF `LlamaForCausalLM` / `Qwen2ForCausalLM`: embeddings, scanned layers, norm, lm_head."""

  def __init__(self, cfg, precision: Precision, *, rngs: nnx.Rngs):
    if cfg.arch not in ("llama", "qwen2"):
      raise ValueError(f"llm arch {cfg.arch!r} is not supported; choose 'llama' or 'qwen2'")
    if cfg.attention not in ATTENTIONS:
      raise ValueError(f"unknown llm attention {cfg.attention!r}; choose one of {ATTENTIONS}")
    if cfg.attention == "splash" and jax.default_backend() == "gpu":
      raise ValueError("llm attention='splash' is the Pallas TPU kernel and has no GPU lowering; "
                       "set model.llm.attention='cudnn' or 'xla'")
    self.precision = precision
    self.num_layers, self.num_kv_heads, self.head_dim = (cfg.num_layers, cfg.num_kv_heads,
                                                         cfg.head_dim)
    self.rope_theta = float(cfg.rope_theta)
    self.attention = cfg.attention
    self.remat = cfg.remat
    self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, precision=precision, rngs=rngs)
    self.layers = stack_layers(lambda r: LlamaDecoderLayer(cfg, precision, rngs=r),
                               cfg.num_layers, rngs)
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, axis_name="norm",
                        precision=precision)
    self.lm_head = (None if cfg.tie_embeddings else
                    Linear(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"),
                           use_bias=False, precision=precision, rngs=rngs))

  def embed(self, ids: jax.Array) -> jax.Array:
    """ids: [B, S] int32 -> [B, S, E] in the compute dtype."""
    return self.embed_tokens(ids)

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """An empty KV cache: k/v [L, B, KVH, T, D], valid [B, T] bool, index int32 (next free slot).

    Callers keep index + S <= max_len: under jit an overflowing write cannot raise, and
    `lax.dynamic_update_slice` would clamp it onto the last slots.
    """
    dtype = self.precision.dtype if dtype is None else dtype
    shape = (self.num_layers, batch, self.num_kv_heads, max_len, self.head_dim)
    return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                valid=jnp.zeros((batch, max_len), bool), index=jnp.zeros((), jnp.int32))

  def __call__(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
               positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
               cache: Cache | None = None) -> tuple[jax.Array, Cache | None]:
    """input_ids: [B, S] or inputs_embeds: [B, S, E] -> (logits [B, S, V] float32, cache | None).

    attention_mask [B, S]: 1 = real token, 0 = padding (padding keys are never attended; rows of
    padding queries are unspecified). positions [B, S]: RoPE positions, default arange(S) offset
    by the cache index; with left padding pass e.g. cumsum(mask) - 1.
    """
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(
        self.precision.dtype)
    b, s, _ = x.shape
    real = (jnp.ones((b, s), bool) if attention_mask is None
            else jnp.asarray(attention_mask).astype(bool))
    index = None if cache is None else cache["index"]
    offset = 0 if cache is None else index
    if positions is None:
      positions = jnp.broadcast_to(offset + jnp.arange(s, dtype=jnp.int32), (b, s))
    cos, sin = rope_cos_sin(positions, self.head_dim, self.rope_theta, self.precision.dtype)

    if cache is None:
      valid, xs = real, None
    else:
      valid = jax.lax.dynamic_update_slice(cache["valid"], real, (0, index))
      xs = (cache["k"], cache["v"])
    # Query s sits at slot offset + s and sees slots up to it that hold real tokens.
    slots = jnp.arange(valid.shape[1])
    mask = (slots[None, :] <= offset + jnp.arange(s)[:, None])[None] & valid[:, None, :]
    causal_only = cache is None and attention_mask is None

    def body(layer, h, kv):
      h, new_kv = layer(h, cos, sin, mask, causal_only, kv, index)
      return constrain(h, ("batch", None, None)), new_kv

    x, new_kv = scan_layers(self.layers, body, constrain(x, ("batch", None, None)), xs,
                            remat=self.remat)
    x = self.norm(x)
    p = self.precision
    if self.lm_head is None:
      logits = jnp.einsum("bse,ve->bsv", x, self.embed_tokens.embedding[...].astype(p.dtype),
                          precision=p.matmul, preferred_element_type=jnp.float32)
    else:
      logits = jnp.matmul(x, self.lm_head.kernel[...].astype(p.dtype), precision=p.matmul,
                          preferred_element_type=jnp.float32)
    logits = constrain(logits, ("batch", None, "vocab"))
    if cache is None:
      return logits, None
    return logits, dict(k=new_kv[0], v=new_kv[1], valid=valid, index=index + s)
