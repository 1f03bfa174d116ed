"""The LLM tokenizers: Vicuna / LLaMA SentencePiece with the ids of transformers 4.37's slow
`LlamaTokenizer`, and Qwen2's byte-level BPE (`Qwen2Tokenizer`); `load_tokenizer` picks by files.

The official model was trained with `LlamaTokenizer(legacy=False)` of transformers 4.37.2 (slow,
sentencepiece based). transformers >= 5 has no slow Llama tokenizer and its fast one gives other
ids for text that starts with a space and for runs of spaces (text-side.md), so this module
rebuilds the 4.37 behaviour on plain `sentencepiece`:

legacy=False (Vicuna v1.5; text-side.md "transformers 5 does not reproduce these ids"):
  1. the model is loaded with the normaliser's `add_dummy_prefix` switched off;
  2. every "▁" in the text becomes a space and one "▁" is prepended;
  3. the text is split on the special tokens `<unk>` `<s>` `</s>` (kept as their ids);
  4. each other chunk is encoded; a chunk starting with "▁" or a space is encoded as
     "<unk>" + chunk with the pieces of "<unk>" dropped, because sentencepiece strips a leading
     "▁" when the dummy prefix is off;
  5. a lone "▁" followed by a special token at the start is dropped;
  6. BOS is prepended (`add_bos_token`), EOS appended only if `add_eos_token`.
legacy=True (transformers 4.37's default when tokenizer_config.json has no `legacy` key): plain
  sentencepiece with its dummy prefix on each chunk between special tokens.

No jax import: this runs in grain worker processes.
"""

from __future__ import annotations

import json
import pathlib
import re
import warnings
from typing import Any, Iterable

import sentencepiece as spm

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id; never a vocabulary id
SPIECE_UNDERLINE = "▁"


class TokenizerError(ValueError):
  """A tokenizer folder that cannot be used (missing or corrupt files)."""


def _token_content(value: Any, default: str) -> str:
  """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
  if value is None:
    return default
  if isinstance(value, dict):
    return str(value.get("content", default))
  return str(value)


def _without_dummy_prefix(model_bytes: bytes) -> bytes:
  """The model with `normalizer_spec.add_dummy_prefix = False` (what legacy=False loads)."""
  from sentencepiece import sentencepiece_model_pb2  # needs protobuf; only the non-legacy path

  proto = sentencepiece_model_pb2.ModelProto()
  proto.ParseFromString(model_bytes)
  proto.normalizer_spec.add_dummy_prefix = False
  return proto.SerializeToString()


class LlamaSpmTokenizer:
  """transformers 4.37 slow `LlamaTokenizer` ids on plain sentencepiece (Vicuna v1.5, LLaMA-1/2).

  `LlamaSpmTokenizer(folder)` reads `folder/tokenizer.model` and, when present,
  `folder/tokenizer_config.json` (`legacy`, `add_bos_token`, `add_eos_token`, `model_max_length`,
  `padding_side`, `bos_token`/`eos_token`/`unk_token`). Keyword arguments override the file.
  A missing `legacy` key means legacy=False here (what Vicuna v1.5 ships) with a warning, because
  transformers 4.37 would silently use legacy=True (text-side.md correction 10).

  pad = unk (LLaVA sets `tokenizer.pad_token = tokenizer.unk_token`), so `pad_id == unk_id == 0`.
  Picklable (grain workers): the state is the serialized model plus the settings.
  """

  def __init__(self, folder: str | pathlib.Path, *, legacy: bool | None = None,
               add_bos_token: bool | None = None, add_eos_token: bool | None = None,
               model_max_length: int | None = None, padding_side: str | None = None):
    self.folder = pathlib.Path(folder)
    model_path = self.folder / "tokenizer.model"
    if not model_path.is_file():
      raise TokenizerError(f"tokenizer folder {self.folder}: no tokenizer.model (the SentencePiece "
                           "model of the checkpoint, e.g. Vicuna-7B v1.5's) was found there")
    config = self._read_config()

    legacy_unset = legacy is None and "legacy" not in config
    self.legacy = bool(config.get("legacy", False) if legacy is None else legacy)
    self.add_bos_token = bool(config.get("add_bos_token", True) if add_bos_token is None
                              else add_bos_token)
    self.add_eos_token = bool(config.get("add_eos_token", False) if add_eos_token is None
                              else add_eos_token)
    # Absent: Vicuna's context length. Training passes its own limit to `preprocess` anyway.
    self.model_max_length = int(config.get("model_max_length", 4096) if model_max_length is None
                                else model_max_length)
    self.padding_side = str(config.get("padding_side", "right") if padding_side is None
                            else padding_side)
    self.unk_token = _token_content(config.get("unk_token"), "<unk>")
    self.bos_token = _token_content(config.get("bos_token"), "<s>")
    self.eos_token = _token_content(config.get("eos_token"), "</s>")
    self._model_bytes = model_path.read_bytes()
    self._load()
    if legacy_unset:
      warnings.warn(
          f"tokenizer folder {self.folder}: tokenizer_config.json has no 'legacy' key; using "
          "legacy=False as Vicuna v1.5 ships it. transformers 4.37 would use legacy=True here "
          "(different ids after special tokens); pass legacy= explicitly to silence this.",
          UserWarning, stacklevel=2)

  def _read_config(self) -> dict[str, Any]:
    path = self.folder / "tokenizer_config.json"
    if not path.is_file():
      return {}
    try:
      config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
      raise TokenizerError(f"tokenizer folder {self.folder}: cannot read {path.name}: {e}") from e
    if not isinstance(config, dict):
      raise TokenizerError(f"tokenizer folder {self.folder}: {path.name} is not a JSON object")
    return config

  def _load(self) -> None:
    try:
      model_bytes = self._model_bytes if self.legacy else _without_dummy_prefix(self._model_bytes)
      self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    except ImportError as e:
      raise ImportError("LlamaSpmTokenizer(legacy=False) edits the SentencePiece model proto and "
                        f"needs the protobuf package: {e}") from e
    except Exception as e:  # protobuf DecodeError, sentencepiece RuntimeError, ...
      raise TokenizerError(f"tokenizer folder {self.folder}: tokenizer.model is not a valid "
                           f"SentencePiece model ({type(e).__name__}: {e})") from e
    self.vocab_size = self._sp.get_piece_size()
    self.unk_id = self._special_id(self.unk_token)
    self.bos_id = self._special_id(self.bos_token)
    self.eos_id = self._special_id(self.eos_token)
    self.pad_id = self.unk_id
    self._special_ids = {self.unk_token: self.unk_id, self.bos_token: self.bos_id,
                         self.eos_token: self.eos_id}
    longest_first = sorted(self._special_ids, key=len, reverse=True)
    self._special_split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")
    # How many pieces "<unk>" encodes to: the prefix dropped again in step 4 (3 for LLaMA).
    self._unk_prefix_len = len(self._sp.encode(self.unk_token))
    self._underline_id = self._sp.piece_to_id(SPIECE_UNDERLINE)

  def _special_id(self, token: str) -> int:
    token_id = self._sp.piece_to_id(token)
    if self._sp.id_to_piece(token_id) != token:
      raise TokenizerError(f"tokenizer folder {self.folder}: special token {token!r} is not a "
                           "piece of tokenizer.model")
    return token_id

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()
    for key in ("_sp", "_special_split"):
      state.pop(key)
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._load()

  def __repr__(self) -> str:
    return (f"LlamaSpmTokenizer(folder={str(self.folder)!r}, legacy={self.legacy}, "
            f"vocab_size={self.vocab_size}, model_max_length={self.model_max_length})")

  # --- encoding ---------------------------------------------------------------------------------

  def _encode_chunk(self, chunk: str) -> list[int]:
    if self.legacy or not chunk.startswith((SPIECE_UNDERLINE, " ")):
      return self._sp.encode(chunk)
    ids = self._sp.encode(self.unk_token + chunk)
    return ids[self._unk_prefix_len:] if len(ids) >= self._unk_prefix_len else ids

  def _tokenize(self, text: str) -> list[int]:
    """Ids without BOS/EOS: 4.37's `LlamaTokenizer.tokenize` followed by `convert_tokens_to_ids`."""
    if not text:
      return []
    if not self.legacy:
      text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
    ids: list[int] = []
    is_special: list[bool] = []
    for k, chunk in enumerate(self._special_split.split(text)):
      if not chunk:
        continue
      if k % 2:  # odd positions of re.split with one group are the separators
        ids.append(self._special_ids[chunk])
        is_special.append(True)
      else:
        chunk_ids = self._encode_chunk(chunk)
        ids.extend(chunk_ids)
        is_special.extend([False] * len(chunk_ids))
    if (not self.legacy and len(ids) > 1 and ids[0] == self._underline_id and not is_special[0]
        and is_special[1]):
      ids = ids[1:]
    return ids

  def encode(self, text: str, add_bos: bool | None = None,
             add_eos: bool | None = None) -> list[int]:
    """`tokenizer(text).input_ids` of transformers 4.37: ids with BOS/EOS as the config says.

    add_bos / add_eos: None follows `add_bos_token` / `add_eos_token` (Vicuna: BOS yes, EOS no).
    Empty text gives [bos_id].
    """
    ids = self._tokenize(text)
    if self.add_bos_token if add_bos is None else add_bos:
      ids = [self.bos_id] + ids
    if self.add_eos_token if add_eos is None else add_eos:
      ids = ids + [self.eos_id]
    return ids

  def tokenizer_image_token(self, prompt: str,
                            image_token_index: int = IMAGE_TOKEN_INDEX) -> list[int]:
    """LLaVA's `tokenizer_image_token` (official-spec §6.2, text-side.md corrections 1 and 7).

    Each "<image>"-separated chunk is tokenized on its own (with BOS, as `encode`), chunks are
    never merged; `image_token_index` goes between chunks. If the first chunk starts with BOS,
    the first id of every later chunk is dropped (its BOS) and only the first BOS is kept.
    """
    chunks = [self.encode(chunk) for chunk in prompt.split(IMAGE_TOKEN)]
    offset = 1 if chunks[0] and chunks[0][0] == self.bos_id else 0
    ids = list(chunks[0])
    for chunk in chunks[1:]:
      ids.append(image_token_index)
      ids.extend(chunk[offset:])
    return ids

  # --- decoding ---------------------------------------------------------------------------------

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """transformers 4.37 `decode(ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)`.

    The "▁" of the first piece is removed (the prefix `encode` adds); special tokens are written
    as their text when kept (legacy mode puts a space before one that follows text). Ids outside
    [0, vocab_size), such as IMAGE_TOKEN_INDEX, raise ValueError.
    """
    special = set(self._special_ids.values())
    kept: list[int] = []
    for token_id in ids:
      token_id = int(token_id)
      if not 0 <= token_id < self.vocab_size:
        raise ValueError(f"cannot decode id {token_id}: outside the vocabulary [0, "
                         f"{self.vocab_size}) (IMAGE_TOKEN_INDEX={IMAGE_TOKEN_INDEX} included)")
      if skip_special_tokens and token_id in special:
        continue
      kept.append(token_id)
    if not kept:
      return ""
    pieces = [self._sp.id_to_piece(token_id) for token_id in kept]
    if pieces[0].startswith(SPIECE_UNDERLINE):
      pieces[0] = pieces[0][1:]
    out: list[str] = []
    pending: list[str] = []
    prev_special = False
    for i, (token_id, piece) in enumerate(zip(kept, pieces)):
      if token_id in special:
        if self.legacy and not prev_special and i != 0:
          out.append(" ")
        out.append(self._decode_pieces(pending) + piece)
        pending = []
        prev_special = True
      else:
        pending.append(piece)
        prev_special = False
    out.append(self._decode_pieces(pending))
    return "".join(out)

  def _decode_pieces(self, pieces: list[str]) -> str:
    pieces = [p for p in pieces if p]  # an emptied first piece ("▁" minus its "▁") adds nothing
    return self._sp.decode_pieces(pieces) if pieces else ""


# The Vicuna v1.5 tokenizer is this class on its tokenizer folder; both names are used in the docs.
VicunaTokenizer = LlamaSpmTokenizer


class Qwen2Tokenizer:
  """Qwen2's byte-level BPE from a `tokenizer.json` (the `tokenizers` library transformers' fast
  tokenizer runs), with the settings of `tokenizer_config.json` beside it.

  No BOS (Qwen2 has none), so `encode` is `tokenizer(text).input_ids`; the chatml markers
  `<|im_start|>` / `<|im_end|>` are special tokens recognised in text. eos is `<|im_end|>` (the
  end of an assistant turn, where `hiwin generate` stops), pad `<|endoftext|>`. Picklable.
  """

  def __init__(self, folder: str | pathlib.Path):
    from tokenizers import Tokenizer
    self.folder = pathlib.Path(folder)
    path = self.folder / "tokenizer.json"
    if not path.is_file():
      raise TokenizerError(f"tokenizer folder {self.folder}: no tokenizer.json (a Qwen2 "
                           "checkpoint's BPE tokenizer) was found there")
    config_path = self.folder / "tokenizer_config.json"
    try:
      config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
      self._tok = Tokenizer.from_file(str(path))
    except Exception as e:  # OSError, JSON or tokenizers' parse errors
      raise TokenizerError(f"tokenizer folder {self.folder}: cannot read it: {e}") from e
    if not isinstance(config, dict):
      raise TokenizerError(f"tokenizer folder {self.folder}: tokenizer_config.json is not a JSON "
                           "object")
    self.model_max_length = int(config.get("model_max_length", 32768))
    self.legacy = False
    self.bos_id = None
    self.eos_id = self._special_id(_token_content(config.get("eos_token"), "<|im_end|>"))
    self.pad_id = self._special_id(_token_content(config.get("pad_token"), "<|endoftext|>"))
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

  def _special_id(self, token: str) -> int:
    token_id = self._tok.token_to_id(token)
    if token_id is None:
      raise TokenizerError(f"tokenizer folder {self.folder}: special token {token!r} is not in "
                           "tokenizer.json")
    return token_id

  def __repr__(self) -> str:
    return f"Qwen2Tokenizer(folder={str(self.folder)!r}, vocab_size={self.vocab_size})"

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids if text else []

  # LLaVA's rule, shared: with no BOS (bos_id None) no chunk has a first id to drop.
  tokenizer_image_token = LlamaSpmTokenizer.tokenizer_image_token

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"cannot decode id {bad[0]}: outside the vocabulary [0, {self.vocab_size})"
                       f" (IMAGE_TOKEN_INDEX={IMAGE_TOKEN_INDEX} included)")
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer(folder: str | pathlib.Path) -> LlamaSpmTokenizer | Qwen2Tokenizer:
  """The tokenizer a checkpoint folder holds: `tokenizer.model` -> SentencePiece (Vicuna),
  else `tokenizer.json` -> Qwen2's BPE."""
  folder = pathlib.Path(folder)
  if (folder / "tokenizer.model").is_file() or not (folder / "tokenizer.json").is_file():
    return LlamaSpmTokenizer(folder)
  return Qwen2Tokenizer(folder)
