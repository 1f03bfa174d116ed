"""Decoding with the KV cache: greedy, temperature + top-p sampling, and HF-semantics beam search.

Every decoder is a pure function of the model (an `nnx.Module`: `LlavaUHD`, or a bare
`LlamaModel` for LLM-only use) and a batch, so it runs under `jax.jit`; `Generator` wraps the
jitting and the padding of requests into static shapes.

Batch layout (see `hiwin_jax.models.llava_uhd`): right-padded rows `input_ids`/`image_token`/
`attention_mask` [B, S] and the image `buckets`. The prompt fills cache slots [0, S) (padding slots
stay invalid), new token i of row b goes to slot S + i at RoPE position len_b + i, so rows of
different prompt lengths and image sizes decode together and give what each gives alone.

What compiles: one program per (batch signature, `GenerationConfig`). The batch signature is the
number of rows, the padded prompt length S and each image bucket's (slots, canvas) shape;
`Generator` rounds rows up to a power of two and S up to a multiple of `seq_multiple` so a stream of
requests reuses a handful of programs. Temperature, top-p, beams, max_new_tokens and EOS are static
(part of the config); the sampling seed is a traced argument and does not recompile.

Decoding stops when every row is finished (EOS) or after `max_new_tokens` (a `lax.while_loop`
with a static-size output buffer), so short answers cost only their own steps.

Beam search reproduces transformers' `generate(num_beams=K, do_sample=False)` (the vectorised
`_beam_search` of transformers >= 4.50, the same results as the 4.37 `BeamSearchScorer` that the
official evaluation ran):
  * all K beams start from the prompt, beams 1..K-1 with score -1e9, so step 0 expands beam 0;
  * each step takes the top 2K of (beam score + log_softmax(logits)) over K x V candidates;
  * a candidate that ends in EOS, or reaches `max_new_tokens`, is finished; it may enter the K
    finished hypotheses only if it ranks among the first K of the 2K, with the score
    sum_logprob / generated_length ** length_penalty (the length counts the EOS; with
    length_penalty 1.0 this is the mean log-probability);
  * the K best unfinished candidates continue (the cache rows are reordered accordingly);
  * early_stopping=False: a row stops once all K finished slots are full and the best running
    beam's score / current_length ** length_penalty cannot beat the worst finished one;
  * the answer is the best finished hypothesis; tokens after its EOS are `pad_token_id`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np
from flax import nnx

NEG = -1.0e9  # transformers' "impossible" beam score
StreamFn = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """Decoding settings (hashable: part of the compile key).

  temperature 0 means deterministic decoding (greedy, or beam search when num_beams > 1), as the
  official `do_sample = temperature > 0`. top_p < 1 keeps the smallest set of most likely tokens
  whose probability reaches top_p (HF `TopPLogitsWarper`, applied after the temperature).
  """
  max_new_tokens: int = 128
  num_beams: int = 1
  temperature: float = 0.0
  top_p: float = 1.0
  eos_token_id: int | None = 2
  pad_token_id: int = 0
  length_penalty: float = 1.0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.num_beams < 1:
      raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.num_beams > 1 and self.temperature > 0:
      raise ValueError("beam sampling is not supported: use num_beams=1 with temperature > 0, or "
                       "temperature=0 with num_beams > 1")

  @property
  def do_sample(self) -> bool:
    return self.temperature > 0


@dataclasses.dataclass
class GenerationOutput:
  """tokens [B, N] (pad after a row's end), lengths [B] (new tokens incl. EOS), scores [B]
  (beam search: the length-normalised log-probability; otherwise the summed log-probability of
  the emitted tokens under the unmodified model distribution)."""
  tokens: Any
  lengths: Any
  scores: Any


jax.tree_util.register_dataclass(GenerationOutput, data_fields=["tokens", "lengths", "scores"],
                                 meta_fields=[])


# --- model plumbing -----------------------------------------------------------------------------

def _llm(model):
  return model.llm if hasattr(model, "llm") else model


def prefill(model, batch: dict[str, Any], cache_len: int):
  """Runs the prompt -> (last real logits [B, V], cache, prompt lengths [B]).

  `model` is a `LlavaUHD` (batch with images) or a `LlamaModel` (`input_ids`, `attention_mask`).
  """
  ids = batch["input_ids"]
  b, s = ids.shape
  mask = jnp.asarray(batch["attention_mask"]).astype(bool)
  lengths = jnp.sum(mask.astype(jnp.int32), axis=1)
  cache = _llm(model).init_cache(b, cache_len)
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  if hasattr(model, "llm"):
    logits, cache = model(batch, cache=cache, positions=positions)
  else:
    logits, cache = model(ids, attention_mask=mask, positions=positions, cache=cache)
  last = jnp.take_along_axis(logits, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
  return last, cache, lengths


def _step(model, tokens: jax.Array, positions: jax.Array, cache):
  """tokens, positions: [R] -> (logits [R, V], cache)."""
  logits, cache = _llm(model)(tokens[:, None], positions=positions[:, None], cache=cache)
  return logits[:, 0], cache


def top_p_logits(logits: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """logits [..., V] -> logits / temperature with the tokens outside the top-p nucleus at -inf.

  HF `TemperatureLogitsWarper` then `TopPLogitsWarper(min_tokens_to_keep=1)`: sort by probability,
  keep a token while the probability mass strictly before it is < top_p (so the token that
  crosses top_p is kept, and always the most likely one).
  """
  scaled = logits.astype(jnp.float32) / temperature
  if top_p >= 1.0:
    return scaled
  order = jnp.argsort(-scaled, axis=-1)
  sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = before < top_p
  keep_sorted = keep_sorted.at[..., 0].set(True)
  keep = jnp.zeros_like(keep_sorted).at[
      tuple(jnp.indices(order.shape)[:-1]) + (order,)].set(keep_sorted)
  return jnp.where(keep, scaled, -jnp.inf)


def _stream(fn: StreamFn | None, step, tokens, active) -> None:
  if fn is not None:
    jax.experimental.io_callback(
        lambda s, t, a: fn(np.asarray(s), np.asarray(t), np.asarray(a)), None, step, tokens,
        active, ordered=True)


# --- greedy and sampling -------------------------------------------------------------------------

def _decode_simple(model, batch, gen: GenerationConfig, rng, stream):
  logits, cache, lengths = prefill(model, batch, batch["input_ids"].shape[1] + gen.max_new_tokens)
  return decode(model, logits, cache, lengths, gen, rng=rng, stream=stream)


def decode(model, logits: jax.Array, cache, lengths: jax.Array, gen: GenerationConfig, *,
           rng: jax.Array | None = None, stream: StreamFn | None = None) -> GenerationOutput:
  """The greedy / sampling loop from a prefilled cache: `prefill`'s (logits, cache, lengths) ->
  `max_new_tokens` new tokens (jit-able; `generate` is `prefill` then this).

  Token 0 comes from the prefill logits, tokens 1..max_new_tokens-1 from one single-token LLM
  step each, so the cache needs S + max_new_tokens - 1 slots (`generate` allocates S +
  max_new_tokens). Not for beam search (`num_beams` must be 1).
  """
  if gen.num_beams > 1:
    raise ValueError("decode runs greedy decoding or sampling only (num_beams=1)")
  n = gen.max_new_tokens
  b = logits.shape[0]
  eos = -1 if gen.eos_token_id is None else gen.eos_token_id
  key = jax.random.PRNGKey(0) if rng is None else rng

  def pick(logits, i):
    if gen.do_sample:
      return jax.random.categorical(jax.random.fold_in(key, i),
                                    top_p_logits(logits, gen.temperature, gen.top_p), axis=-1)
    return jnp.argmax(logits, axis=-1)

  def emit(i, logits, done, out, score):
    tok = pick(logits, i).astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], axis=1)[:, 0]
    _stream(stream, i, jnp.where(done, gen.pad_token_id, tok), ~done)
    out = out.at[:, i].set(jnp.where(done, gen.pad_token_id, tok))
    score = score + jnp.where(done, 0.0, logp)
    length_inc = (~done).astype(jnp.int32)
    return tok, done | (tok == eos), out, score, length_inc

  out = jnp.full((b, n), gen.pad_token_id, jnp.int32)
  done = jnp.zeros((b,), bool)
  tok, done, out, score, gen_len = emit(0, logits, done, out, jnp.zeros((b,), jnp.float32))

  def cond(carry):
    i, _, _, done, *_ = carry
    return (i < n) & ~jnp.all(done)

  def body(carry):
    i, tok, cache, done, out, score, gen_len = carry
    logits, cache = _step(model, tok, lengths + i - 1, cache)
    tok, done, out, score, inc = emit(i, logits, done, out, score)
    return i + 1, tok, cache, done, out, score, gen_len + inc

  carry = (jnp.int32(1), tok, cache, done, out, score, gen_len)
  _, _, _, _, out, score, gen_len = jax.lax.while_loop(cond, body, carry)
  return GenerationOutput(out, gen_len, score)


# --- beam search ----------------------------------------------------------------------------------

def _gather(x, index):
  """x [B, M, ...], index [B, K] -> [B, K, ...]."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _beam_search(model, batch, gen: GenerationConfig):
  n, k, lp = gen.max_new_tokens, gen.num_beams, gen.length_penalty
  logits, cache, lengths = prefill(model, batch, batch["input_ids"].shape[1] + n)
  b, v = logits.shape
  eos = -1 if gen.eos_token_id is None else gen.eos_token_id
  # All beams share the prompt: tile the prefilled cache instead of prefilling K copies.
  cache = dict(cache, k=jnp.repeat(cache["k"], k, axis=1), v=jnp.repeat(cache["v"], k, axis=1),
               valid=jnp.repeat(cache["valid"], k, axis=0))
  logits = jnp.repeat(logits, k, axis=0)
  beam_lengths = jnp.repeat(lengths, k)
  top_mask = jnp.arange(2 * k) < k

  state = dict(
      run_seq=jnp.full((b, k, n), gen.pad_token_id, jnp.int32),
      run_score=jnp.full((b, k), NEG, jnp.float32).at[:, 0].set(0.0),
      fin_seq=jnp.full((b, k, n), gen.pad_token_id, jnp.int32),
      fin_score=jnp.full((b, k), NEG, jnp.float32),
      fin_flag=jnp.zeros((b, k), bool),
      open=jnp.ones((b,), bool),       # transformers' is_early_stop_heuristic_unsatisfied
      logits=logits, cache=cache, i=jnp.int32(0))

  def select(st):
    i = st["i"]
    logp = jax.nn.log_softmax(st["logits"].astype(jnp.float32), axis=-1).reshape(b, k, v)
    acc = (logp + st["run_score"][:, :, None]).reshape(b, k * v)
    top_score, top_index = jax.lax.top_k(acc, 2 * k)                    # [B, 2K]
    src, tok = top_index // v, (top_index % v).astype(jnp.int32)
    seq = _gather(st["run_seq"], src).at[:, :, i].set(tok)                # [B, 2K, N]
    hits = (tok == eos) | (i == n - 1)
    # Running beams: the K best candidates that did not finish.
    running = top_score + hits * NEG
    next_score, pick = jax.lax.top_k(running, k)
    # Finished hypotheses: merge the newly finished top-K candidates into the K kept ones.
    just = hits & top_mask[None]
    cand = top_score / ((i + 1).astype(jnp.float32) ** lp)
    cand = cand + (~st["open"])[:, None] * NEG + (~just) * NEG
    merged_score = jnp.concatenate([st["fin_score"], cand], axis=1)
    _, keep = jax.lax.top_k(merged_score, k)
    fin_seq = _gather(jnp.concatenate([st["fin_seq"], seq], axis=1), keep)
    fin_score = _gather(merged_score, keep)
    fin_flag = _gather(jnp.concatenate([st["fin_flag"], just], axis=1), keep)
    # Early-stop heuristic (early_stopping=False): compare at the current generated length.
    best_running = next_score[:, :1] / ((i + 1).astype(jnp.float32) ** lp)
    worst = jnp.where(fin_flag, jnp.min(fin_score, axis=1, keepdims=True), NEG)
    still_open = st["open"] & jnp.any(best_running > worst, axis=1)
    beam_src = _gather(src, pick)                                       # [B, K]
    return dict(st, run_seq=_gather(seq, pick), run_score=next_score, fin_seq=fin_seq,
                fin_score=fin_score, fin_flag=fin_flag, open=still_open,
                i=i + 1), beam_src, _gather(tok, pick)

  def advance(st, beam_src, tok):
    flat = (jnp.arange(b)[:, None] * k + beam_src).reshape(-1)
    c = st["cache"]
    c = dict(c, k=jnp.take(c["k"], flat, axis=1), v=jnp.take(c["v"], flat, axis=1),
             valid=jnp.take(c["valid"], flat, axis=0))
    logits, c = _step(model, tok.reshape(-1), beam_lengths + st["i"] - 1, c)
    return dict(st, logits=logits, cache=c)

  def cond(st):
    return (st["i"] < n) & jnp.any(st["open"])

  def body(st):
    st, beam_src, tok = select(st)
    return jax.lax.cond(cond(st), lambda s: advance(s, beam_src, tok), lambda s: s, st)

  st = jax.lax.while_loop(cond, body, state)
  best = st["fin_seq"][:, 0]
  is_eos = best == eos
  ended = jnp.any(is_eos, axis=1)
  out_len = jnp.where(ended, jnp.argmax(is_eos, axis=1) + 1, n).astype(jnp.int32)
  best = jnp.where(jnp.arange(n)[None] < out_len[:, None], best, gen.pad_token_id)
  return GenerationOutput(best, out_len, st["fin_score"][:, 0])


# --- entry points ---------------------------------------------------------------------------------

def generate(model, batch: dict[str, Any], gen: GenerationConfig, *,
             rng: jax.Array | None = None, stream: StreamFn | None = None) -> GenerationOutput:
  """Decodes `batch` with `model` (jit-able; `gen` and `stream` are static).

  rng: a PRNG key for sampling (ignored otherwise). stream: called on the host after every step
  as `stream(step, tokens [B], active [B])` (greedy and sampling only; a finished row is
  inactive and shows pad).
  """
  if gen.num_beams > 1:
    if stream is not None:
      raise ValueError("streaming is not available with beam search: the answer is known only "
                       "at the end")
    return _beam_search(model, batch, gen)
  return _decode_simple(model, batch, gen, rng, stream)


def round_up_rows(n: int) -> int:
  """Rows of a compiled batch: the next power of two (bounded number of programs)."""
  return 1 << max(n - 1, 0).bit_length()


def pad_batch(batch: dict[str, Any], rows: int, seq_len: int) -> dict[str, Any]:
  """Right-pads a host batch (numpy) to `rows` rows and `seq_len` positions.

  Padding rows hold one text token (id 0), so their attention stays NaN-free; they are dropped
  from the outputs by the caller.
  """
  b, s = batch["input_ids"].shape
  if s > seq_len or b > rows:
    raise ValueError(f"batch [{b}, {s}] does not fit [{rows}, {seq_len}]")
  out = {}
  for name, fill in (("input_ids", 0), ("image_token", -1), ("attention_mask", False)):
    x = np.asarray(batch[name])
    y = np.full((rows, seq_len), fill, x.dtype)
    y[:b, :s] = x
    out[name] = y
  out["attention_mask"][b:, 0] = True
  out["buckets"] = tuple(batch.get("buckets") or ())
  return out


_PROGRAMS: dict[tuple, Callable] = {}


class Generator:
  """Jitted decoding for one model: one compiled program per (model structure, batch signature,
  generation config), shared by every Generator of the same structure (a re-loaded or
  further-trained model of the same config does not recompile).

  `Generator(model)(batch, gen, seed=0)` pads the batch (rows to a power of two, positions to a
  multiple of `seq_multiple`), runs `generate` and returns numpy outputs for the real rows.
  """

  def __init__(self, model, seq_multiple: int = 64):
    self.graphdef, self.state = nnx.split(model)
    self.seq_multiple = seq_multiple

  def _fn(self, gen: GenerationConfig, stream: StreamFn | None):
    key = (self.graphdef, gen, stream)
    if key not in _PROGRAMS:
      graphdef = self.graphdef

      @jax.jit
      def run(state, batch, rng):
        return generate(nnx.merge(graphdef, state), batch, gen, rng=rng, stream=stream)
      _PROGRAMS[key] = run
    return _PROGRAMS[key]

  def __call__(self, batch: dict[str, Any], gen: GenerationConfig, *, seed: int = 0,
               stream: StreamFn | None = None) -> GenerationOutput:
    b, s = np.asarray(batch["input_ids"]).shape
    seq_len = -(-s // self.seq_multiple) * self.seq_multiple
    padded = pad_batch(batch, round_up_rows(b), seq_len)
    padded = jax.tree.map(jnp.asarray, padded)
    out = self._fn(gen, stream)(self.state, padded, jax.random.PRNGKey(seed))
    out = jax.tree.map(np.asarray, out)
    return GenerationOutput(out.tokens[:b], out.lengths[:b], out.scores[:b])
