"""Host and model read one token geometry, `cfg.model.projector`: with `grid_size` overridden to
8 the model emits 8x8 = 64 Hiwin tokens per item, and a training batch and an inference request
address exactly those tokens (layout, renumbering, requests all follow the config). The model
runs abstractly (`jax.eval_shape`): shapes are what is checked."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from hiwin_jax import config
from hiwin_jax.data import layout, loader, synthetic
from hiwin_jax.infer import requests
from hiwin_jax.models.layers import Precision
from hiwin_jax.models.llava_uhd import LlavaUHD

GRID = 8
VIEW = 168


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("geometry")
  cfg = config.load_config("tiny", [f"--config.model.projector.grid_size={GRID}",
                                    f"--config.model.vision.image_size={VIEW}"])
  model = nnx.eval_shape(lambda: LlavaUHD(cfg.model, Precision.parity(), rngs=nnx.Rngs(0)))
  task = synthetic.write_task(root / "task", 4, 1, seed=0, image_size=(2 * VIEW, VIEW),
                              scale_resolution=VIEW)  # 2 slices + overview
  tok = synthetic.make_tokenizer(root / "tok", task.texts())
  return cfg, model, task, tok


def _run(model, method, batch):
  """The model's output shapes on `batch` (traced, not computed)."""
  graphdef, state = nnx.split(model)
  return jax.eval_shape(lambda st, b: method(nnx.merge(graphdef, st), b), state, batch)


def _model_tokens_per_item(model, buckets):
  tokens = _run(model, lambda m, b: m.encode_images(b), buckets)
  items = sum(len(b["grid"]) for b in buckets)
  assert tokens.shape[0] % items == 0
  return tokens.shape[0] // items


def test_training_batch_addresses_the_models_image_tokens(setup):
  cfg, model, task, tok = setup
  data = config.data_config()
  data.update(json=str(task.sft_json), image_folder=str(task.image_folder), max_length=2048,
              global_batch_size=2, seq_multiple=64, shuffle=False)
  batch = next(loader.make_train_iterator(data, cfg.model, tok))
  micro = {k: v[0] for k, v in batch.items() if k != "meta"}
  micro["buckets"] = tuple({k: v[0] for k, v in b.items()} for b in batch["buckets"])
  per_item = _model_tokens_per_item(model, micro["buckets"])
  assert per_item == GRID * GRID == layout.TokenLayout.from_config(
      cfg.model.projector).tokens_per_item
  items = sum(len(b["grid"]) for b in micro["buckets"])
  assert items == 2 * 3  # no padded slot in a training batch
  used = micro["image_token"][micro["image_token"] >= 0]
  assert sorted(used.tolist()) == list(range(items * per_item))  # each token exactly once
  logits = _run(model, lambda m, b: m(b)[0], micro)
  assert logits.shape == micro["input_ids"].shape + (cfg.model.llm.vocab_size,)


def test_inference_request_addresses_the_models_image_tokens(setup):
  cfg, model, task, tok = setup
  record = json.loads(task.eval_jsonl.read_text().splitlines()[0])
  img = Image.open(task.image_folder / record["image"]).convert("RGB")
  prepared = requests.prepare(record["text"], img, tok, cfg.model, pre_resize=False,
                              max_slice_nums=7)
  assert len(prepared.items) == 3
  batch = requests.collate([prepared], cfg.model)
  per_item = _model_tokens_per_item(model, batch["buckets"])
  assert per_item == GRID * GRID
  filled = [(j, s) for j, b in enumerate(batch["buckets"]) for s in range(len(b["grid"]))
            if b["grid"][s][0] > 0]
  offsets = np.cumsum([0] + [len(b["grid"]) for b in batch["buckets"]])
  want = sorted(int(offsets[j] + s) * per_item + t for j, s in filled for t in range(per_item))
  used = batch["image_token"][batch["image_token"] >= 0]
  assert sorted(used.tolist()) == want
  logits = _run(model, lambda m, b: m(b)[0], batch)
  assert logits.shape == batch["input_ids"].shape + (cfg.model.llm.vocab_size,)
