"""Decoding (`hiwin_jax.infer.generate`): greedy vs full recompute, beam search vs exhaustive search
and vs transformers, top-p sampling, batched requests of different image sizes vs alone."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from hiwin_jax import config as C
from hiwin_jax.data.tokenizer import IMAGE_TOKEN_INDEX
from hiwin_jax.infer import generate as G
from hiwin_jax.infer import requests
from hiwin_jax.models.layers import Precision
from hiwin_jax.models.llama import LlamaModel


def llm(vocab=32, seed=0, scale=1.0, **fields):
  """A 2-layer LLM with random weights; `scale` sharpens the next-token distributions."""
  cfg = C.llm_config()
  cfg.update(dict(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, max_position_embeddings=256), **fields)
  model = LlamaModel(cfg, Precision.parity(), rngs=nnx.Rngs(seed))
  if scale != 1.0:
    model.lm_head.kernel[...] = model.lm_head.kernel[...] * scale
  return model


def prompts(vocab, lengths, seed=0, seq_len=None):
  """Right-padded random prompts: ids, mask [B, S]."""
  rng = np.random.default_rng(seed)
  s = seq_len or max(lengths)
  ids = np.zeros((len(lengths), s), np.int32)
  mask = np.zeros((len(lengths), s), bool)
  for i, n in enumerate(lengths):
    ids[i, :n] = rng.integers(3, vocab, n)
    mask[i, :n] = True
  return ids, mask


def run(model, ids, mask, gen, seed=0, stream=None):
  batch = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  out = jax.jit(lambda b, r: G.generate(model, b, gen, rng=r, stream=stream))(
      batch, jax.random.PRNGKey(seed))
  return jax.tree.map(np.asarray, out)


# --- greedy ------------------------------------------------------------------------------------

def test_greedy_with_cache_equals_full_recompute_per_step():
  model = llm(vocab=64, seed=1)
  ids, mask = prompts(64, [5, 9, 2], seed=3)
  n = 7
  out = run(model, ids, mask, G.GenerationConfig(max_new_tokens=n, eos_token_id=None))
  for row in range(len(ids)):
    seq = list(ids[row, :mask[row].sum()])
    expected = []
    for _ in range(n):
      logits, _ = model(jnp.asarray([seq], jnp.int32))
      expected.append(int(jnp.argmax(logits[0, -1])))
      seq.append(expected[-1])
    assert out.tokens[row].tolist() == expected, f"row {row}"
    assert out.lengths[row] == n


def test_greedy_stops_at_eos_and_pads_after_it():
  model = llm(vocab=64, seed=1)
  ids, mask = prompts(64, [5, 9, 2], seed=3)
  free = run(model, ids, mask, G.GenerationConfig(max_new_tokens=7, eos_token_id=None))
  eos = int(free.tokens[1, 2])  # make row 1 end at its 3rd token
  out = run(model, ids, mask, G.GenerationConfig(max_new_tokens=7, eos_token_id=eos,
                                                 pad_token_id=0))
  for row in range(3):
    toks = free.tokens[row].tolist()
    end = toks.index(eos) + 1 if eos in toks else 7
    assert out.lengths[row] == end
    assert out.tokens[row, :end].tolist() == toks[:end]
    assert (out.tokens[row, end:] == 0).all()


def test_stream_callback_sees_every_step():
  model = llm(vocab=64, seed=1)
  ids, mask = prompts(64, [4, 6], seed=0)
  seen = []
  out = run(model, ids, mask, G.GenerationConfig(max_new_tokens=5, eos_token_id=None),
            stream=lambda step, tok, active: seen.append((int(step), tok.tolist())))
  assert [s for s, _ in seen] == list(range(5))
  assert np.array_equal(np.array([t for _, t in seen]).T, out.tokens)


# --- beam search ---------------------------------------------------------------------------------

def exhaustive_best(model, prompt, vocab, n, eos, length_penalty=1.0):
  """Best (score, tokens) over every continuation of <= n tokens that ends at EOS or at n,
  scored sum logprob / length ** length_penalty (transformers' beam score). One full forward
  (no cache) over all vocab^(n-1) prefixes gives every log-probability needed."""
  prefixes = np.array(list(itertools.product(range(vocab), repeat=n - 1)), np.int32)
  seqs = np.concatenate([np.broadcast_to(prompt, (len(prefixes), len(prompt))), prefixes], 1)
  logits, _ = model(jnp.asarray(seqs))
  lp = np.asarray(jax.nn.log_softmax(logits, -1))[:, len(prompt) - 1:]  # [P, n, V]
  best = (-np.inf, None)
  for length in range(1, n + 1):
    for toks in itertools.product(range(vocab), repeat=length):
      if eos in toks[:-1] or (length < n and toks[-1] != eos):
        continue
      row = int(np.flatnonzero((prefixes[:, :length - 1] == toks[:-1]).all(1))[0])
      score = sum(lp[row, j, t] for j, t in enumerate(toks)) / length ** length_penalty
      best = max(best, (float(score), list(toks)))
  return best


def test_beam_search_equals_exhaustive_search_on_tiny_vocab():
  vocab, n, eos = 5, 3, 2
  model = llm(vocab=vocab, seed=4, scale=6.0)
  ids, mask = prompts(vocab, [3, 5, 4, 2], seed=7)
  ids[~mask] = 0
  k = vocab ** (n - 1)  # every (n-1)-token prefix survives: the search is exhaustive
  out = run(model, ids, mask, G.GenerationConfig(max_new_tokens=n, num_beams=k, eos_token_id=eos))
  ended_early = 0
  for row in range(len(ids)):
    score, toks = exhaustive_best(model, ids[row, :mask[row].sum()], vocab, n, eos)
    got = out.tokens[row, :out.lengths[row]].tolist()
    assert got == toks, f"row {row}: beam {got} vs exhaustive {toks} (score {score:.4f})"
    assert abs(out.scores[row] - score) < 1e-4, (out.scores[row], score)
    ended_early += len(toks) < n
  assert ended_early, "no row ended at EOS: the case does not test EOS scoring"


@pytest.mark.torch
def test_beam_search_matches_transformers_generate(torch):
  transformers = pytest.importorskip("transformers")
  from hiwin_jax.convert import core, formats, hf_llama
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=24, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, max_position_embeddings=128)
  hf = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for key, p in hf.named_parameters():
      p.normal_(0.0, 0.4) if "norm" not in key else p.uniform_(0.5, 1.5)
  cfg = C.llm_config()
  cfg.update(hf_llama.hf_config_to_llm(config.to_dict()))
  base = {k: v.numpy().copy() for k, v in hf.state_dict().items()}
  n, k = 6, 3
  ids, mask = prompts(24, [5, 7], seed=2)
  checked_eos = 0
  # EOS made about as likely as a token the beams like (its lm_head row a scaled copy of that
  # token's), so that EOS-terminated hypotheses compete and their length-normalised scores matter.
  free = run(formats.model_from_source("hf-llm", core.DictSource(dict(base)), cfg,
                                       Precision.parity()), ids, mask,
             G.GenerationConfig(max_new_tokens=n, num_beams=k, eos_token_id=None))
  liked = list(dict.fromkeys(int(t) for t in free.tokens[:, :3].T.reshape(-1)))[:4]
  unused = [t for t in range(3, 24) if t not in set(free.tokens.reshape(-1).tolist())]
  for eos, like, gain in zip(unused, liked, [1.1, 1.3, 1.05, 1.5]):
    state = dict(base)
    state["lm_head.weight"] = base["lm_head.weight"].copy()
    state["lm_head.weight"][eos] = gain * base["lm_head.weight"][like]
    with torch.no_grad():
      hf.lm_head.weight.copy_(torch.from_numpy(state["lm_head.weight"]))
    ours = formats.model_from_source("hf-llm", core.DictSource(dict(state)), cfg,
                                     Precision.parity())
    out = run(ours, ids, mask, G.GenerationConfig(max_new_tokens=n, num_beams=k,
                                                  eos_token_id=eos, pad_token_id=0))
    for row in range(len(ids)):
      prompt = torch.from_numpy(ids[row:row + 1, :mask[row].sum()]).long()
      with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), num_beams=k,
                          do_sample=False, max_new_tokens=n, eos_token_id=eos, pad_token_id=0,
                          length_penalty=1.0, early_stopping=False)
      ref = ref[0, prompt.shape[1]:].tolist()
      if eos in ref:
        ref = ref[:ref.index(eos) + 1]
        checked_eos += len(ref) < n
      assert out.tokens[row, :out.lengths[row]].tolist() == ref, (eos, row)
  assert checked_eos >= 2, f"only {checked_eos} beams ended early at EOS: scoring untested"


# --- sampling ------------------------------------------------------------------------------------

def test_top_p_keeps_the_smallest_nucleus():
  probs = np.array([0.05, 0.5, 0.15, 0.3])
  logits = jnp.log(jnp.asarray(probs))[None]
  for top_p, keep in [(0.4, {1}), (0.7, {1, 3}), (0.9, {1, 3, 2}), (1.0, {0, 1, 2, 3})]:
    filtered = np.asarray(G.top_p_logits(logits, 1.0, top_p))[0]
    assert set(np.flatnonzero(np.isfinite(filtered))) == keep, top_p
    kept = sorted(keep)
    renorm = np.asarray(jax.nn.softmax(jnp.asarray(filtered)))
    np.testing.assert_allclose(renorm[kept], probs[kept] / probs[kept].sum(), rtol=1e-5)
  # Temperature first: at T=0.5 the distribution sharpens to p^2 / sum p^2 before the cut.
  sharp = probs ** 2 / (probs ** 2).sum()  # [.0063, .6993, .0629, .2517]
  filtered = np.asarray(G.top_p_logits(logits, 0.5, 0.9))[0]
  assert set(np.flatnonzero(np.isfinite(filtered))) == {1, 3}, sharp


def test_sampling_is_reproducible_and_respects_top_p():
  model = llm(vocab=64, seed=2)
  ids, mask = prompts(64, [6, 3], seed=1)
  gen = G.GenerationConfig(max_new_tokens=8, temperature=1.0, eos_token_id=None)
  a, b = run(model, ids, mask, gen, seed=5), run(model, ids, mask, gen, seed=5)
  c = run(model, ids, mask, gen, seed=6)
  assert np.array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  # A nucleus this small holds only the most likely token: sampling becomes greedy.
  greedy = run(model, ids, mask, G.GenerationConfig(max_new_tokens=8, eos_token_id=None))
  narrow = run(model, ids, mask, G.GenerationConfig(max_new_tokens=8, temperature=1.0,
                                                    top_p=1e-6, eos_token_id=None), seed=9)
  assert np.array_equal(narrow.tokens, greedy.tokens)


def test_sampling_frequencies_follow_the_filtered_distribution():
  logits = jnp.log(jnp.asarray([[0.05, 0.5, 0.15, 0.3]]))
  filtered = G.top_p_logits(jnp.repeat(logits, 4000, 0), 1.0, 0.7)
  draws = np.asarray(jax.random.categorical(jax.random.PRNGKey(0), filtered))
  freq = np.bincount(draws, minlength=4) / len(draws)
  assert freq[0] == 0 and freq[2] == 0
  assert abs(freq[1] - 0.5 / 0.8) < 0.03, freq


# --- batched multimodal requests -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
  from hiwin_jax.models.llava_uhd import LlavaUHD
  cfg = C.load_config("tiny")
  return cfg, LlavaUHD(cfg.model, Precision.parity(), rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_batched_requests_with_different_images_equal_each_alone(tiny_model):
  cfg, model = tiny_model
  rng = np.random.default_rng(0)
  sizes = [(400, 300), (120, 150)]  # 2 slices + overview; overview only, in another bucket
  prepared = []
  for i, (w, h) in enumerate(sizes):
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    text = rng.integers(3, cfg.model.llm.vocab_size, 4 + 3 * i)
    ids = [1, *text[:2], IMAGE_TOKEN_INDEX, *text[2:]]
    prepared.append(requests.prepare_ids(ids, img, cfg.model, pre_resize=False))
  assert prepared[0].length != prepared[1].length
  gen = G.GenerationConfig(max_new_tokens=4, eos_token_id=None)
  generator = G.Generator(model, seq_multiple=32)
  together = generator(requests.collate(prepared, cfg.model), gen)
  for i, p in enumerate(prepared):
    alone = generator(requests.collate([p], cfg.model), gen)
    assert together.tokens[i].tolist() == alone.tokens[0].tolist(), f"request {i}"
    assert abs(together.scores[i] - alone.scores[0]) < 1e-4
