"""(image, question) -> model batches with the official evaluation prompt (spec §9.1, §1.4).

The official evaluation (`llava/eval/model_vqa_loader.py`) builds, per question:
  qs = "<image>\\n" + question (text-only questions keep the question alone),
  prompt = vicuna_v1 conversation with an open assistant turn ("... USER: <image>\\n{q} ASSISTANT:"),
  ids = tokenizer_image_token(prompt),
  image = eval_pre_resize(image, image_folder) then slice_image(max_slice_nums=9), CLIP-normalised.
`prepare` reproduces that (the image through `image.prepare_image`, as training prepares it, with
the evaluation pre-resize of the model's code state: R1 for the 7B release, R2 for 13B/Qwen2);
`prepare_ids` is the tokenizer-free path (ids already holding the IMAGE_TOKEN_INDEX placeholder)
that tests with the tiny vocabulary use. `collate` packs prepared requests into one right-padded
batch with the model's shape buckets and token geometry.

Host code only (numpy/PIL): it runs before jit.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from hiwin_jax.data import buckets, conversation, image, layout, slicing
from hiwin_jax.data.tokenizer import IMAGE_TOKEN, IMAGE_TOKEN_INDEX

DEFAULT_TEMPLATE = "vicuna_v1"
# The official evaluation scripts' `--conv-mode` per LLM: Vicuna releases vicuna_v1, the Qwen2
# release qwen_1_5 (the same chatml conversation as qwen_2).
ARCH_TEMPLATES = {"llama": DEFAULT_TEMPLATE, "qwen2": "qwen_1_5"}


def model_template(cfg_model) -> str:
  """The conversation template a model was trained with, from its LLM architecture."""
  return ARCH_TEMPLATES[str(cfg_model.llm.arch)]


class RequestError(ValueError):
  """A question that cannot be run (empty prompt, too long for the context, bad image); the
  message says why and is recorded in the answers file."""


@dataclasses.dataclass(frozen=True)
class Prepared:
  """One request ready for `collate`: the spliced sequence and its items' pixels."""
  sequence: layout.Sequence
  items: tuple[np.ndarray, ...]
  prompt: str = ""

  @property
  def length(self) -> int:
    return len(self.sequence.input_ids)


def official_prompt(question: str, has_image: bool, template: str = DEFAULT_TEMPLATE) -> str:
  """The evaluation prompt: "<image>\\n" + question in `template` with an open assistant turn.

  A question that already holds "<image>" is used as is (LLaVA's loader would add a second one;
  question files never do).
  """
  if not question or not question.strip():
    raise RequestError("empty prompt: the question text is empty")
  qs = question
  if has_image and IMAGE_TOKEN not in qs:
    qs = IMAGE_TOKEN + "\n" + qs
  return conversation.build_prompt([{"from": "human", "value": qs}], template)


def image_items(img: Image.Image, cfg_model, *, image_folder: str = "",
                max_slice_nums: int = slicing.EVAL_MAX_SLICE_NUMS, pre_resize: bool = True
                ) -> tuple[layout.ImageLayout, tuple[np.ndarray, ...]]:
  """`image.prepare_image` with the evaluation pre-resize (chosen by the folder name, as the
  official loader does; its R1/R2 variant is `cfg_model.projector.layout`) -> (layout span,
  items [slices..., overview])."""
  rule = functools.partial(image.eval_pre_resize, image_folder=image_folder)
  return image.prepare_image(img, layout.TokenLayout.from_config(cfg_model.projector),
                             max_slice_nums=max_slice_nums,
                             scale_resolution=int(cfg_model.vision.image_size),
                             pre_resize=rule if pre_resize else None)


def _check_length(n: int, max_context: int | None, where: str) -> None:
  if max_context is not None and n > max_context:
    raise RequestError(f"prompt longer than the context: {where} gives {n} LLM positions "
                       f"(text + image tokens + new tokens), the model allows {max_context}")


def prepare_ids(ids: Sequence[int], image: Image.Image | None, cfg_model, *,
                image_folder: str = "", max_slice_nums: int = slicing.EVAL_MAX_SLICE_NUMS,
                pre_resize: bool = True, max_context: int | None = None,
                reserve: int = 0) -> Prepared:
  """Token ids (with one IMAGE_TOKEN_INDEX where the image goes, if any) + image -> Prepared.

  `reserve` new tokens must fit beside the prompt within `max_context` positions.
  """
  ids = np.asarray(ids, np.int64)
  if len(ids) == 0:
    raise RequestError("empty prompt: no token ids")
  places = int(np.sum(ids == IMAGE_TOKEN_INDEX))
  if places != (image is not None):
    raise RequestError(f"the prompt has {places} image placeholders but "
                       f"{'one image' if image is not None else 'no image'} was given")
  spans, items = [], ()
  if image is not None:
    span, items = image_items(image, cfg_model, image_folder=image_folder,
                              max_slice_nums=max_slice_nums, pre_resize=pre_resize)
    spans.append(span)
  seq = layout.splice(ids, None, spans)
  _check_length(len(seq.input_ids) + reserve, max_context, "the prompt")
  return Prepared(seq, items)


def prepare(question: str, image: Image.Image | None, tokenizer, cfg_model, *,
            template: str = DEFAULT_TEMPLATE, image_folder: str = "",
            max_slice_nums: int = slicing.EVAL_MAX_SLICE_NUMS, pre_resize: bool = True,
            max_context: int | None = None, reserve: int = 0) -> Prepared:
  """Question text + image -> Prepared, with the official prompt and tokenization."""
  prompt = official_prompt(question, image is not None, template)
  ids = tokenizer.tokenizer_image_token(prompt)
  p = prepare_ids(ids, image, cfg_model, image_folder=image_folder,
                  max_slice_nums=max_slice_nums, pre_resize=pre_resize,
                  max_context=max_context, reserve=reserve)
  return dataclasses.replace(p, prompt=prompt)


def collate(prepared: Sequence[Prepared], cfg_model, seq_len: int | None = None,
            pad_id: int = 0) -> dict[str, Any]:
  """Right-padded batch (numpy) of prepared requests for the model of `cfg_model` (its shape
  buckets, `buckets.model_buckets(cfg_model.vision)`, and its tokens per item); `seq_len`
  defaults to the longest."""
  if not prepared:
    raise ValueError("collate needs at least one request")
  seq_len = max(p.length for p in prepared) if seq_len is None else seq_len
  tokens = layout.TokenLayout.from_config(cfg_model.projector)
  batch = buckets.make_batch([(p.sequence, list(p.items)) for p in prepared],
                             buckets.model_buckets(cfg_model.vision), seq_len,
                             tokens_per_item=tokens.tokens_per_item, pad_id=pad_id)
  batch.pop("labels")
  return batch
