"""The VDIM (JBU stack) <-> official FeatUp/LLaVA-UHD v2 checkpoints (spec §3.5, §3.7, §8.2).

The same tensors live in two files under two prefixes:
- the VDIM pre-training Lightning checkpoint (`clip-large-vdim.ckpt`): `state_dict['upsampler.*']`
  (its other entries, `downsampler*`, `scale_net*`, the frozen featurizer `model.*` and its
  duplicate `validation_model.*`, are ignored, as the official loader ignores them);
- the LLaVA projector (`mm_projector.bin`, or the full checkpoint):
  `model.mm_projector.upsampler.upsampler.*`.
`jbu_table(prefix=...)` serves both. 1x1 conv weights (O, I, 1, 1) become Linear kernels (I, O);
the two scalars stay 0-d.

Covered: `JBU4xStack` (the released model; keys from the spec) and `JBU2xStack` (`up1.*` +
`fixup_proj.1.*`, inferred from the stack pattern, not checked against the official code). The
official `JBU8xStack` stores per-level `fixup_proj_2x/4x/8x` convs that our 8x stack (the natural
extension of the 4x forward) does not have, so it has no table.

Lightning checkpoints are pickles: `read_torch_tensors` opens them with `weights_only=True`, which
refuses arbitrary objects; torch is imported only there and in `write_vdim_ckpt`.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from typing import Mapping

import numpy as np

from hiwin_jax import outputs
from hiwin_jax.convert.core import (CONV1X1_DENSE, IDENTITY, DictSource, KeysUnder, KeyTable,
                                    Rule, to_ours, to_torch)
from hiwin_jax.convert.safetensors_io import CheckpointError
from hiwin_jax.weights import load_params, model_params, param_targets

UPSAMPLER_PREFIX = "upsampler."  # Lightning VDIM checkpoint, state_dict keys
MM_PROJECTOR_PREFIX = "model.mm_projector.upsampler.upsampler."  # mm_projector.bin / LLaVA file
LIGHTNING_VERSION = "2.1.3"  # only written into exported .ckpt files; nothing reads it

_LEVELS = {2: 1, 4: 2}

# (official key within one JBULearnedRange, our path within JBULearnedRange, transform)
_LEVEL_RULES = (
    ("range_temp", "range_temp", IDENTITY),
    ("range_proj.0.weight", "range_proj_0.kernel", CONV1X1_DENSE),
    ("range_proj.0.bias", "range_proj_0.bias", IDENTITY),
    ("range_proj.3.weight", "range_proj_3.kernel", CONV1X1_DENSE),
    ("range_proj.3.bias", "range_proj_3.bias", IDENTITY),
    ("fixup_proj.0.weight", "fixup_proj_0.kernel", CONV1X1_DENSE),
    ("fixup_proj.0.bias", "fixup_proj_0.bias", IDENTITY),
    ("fixup_proj.3.weight", "fixup_proj_3.kernel", CONV1X1_DENSE),
    ("fixup_proj.3.bias", "fixup_proj_3.bias", IDENTITY),
    ("sigma_spatial", "sigma_spatial", IDENTITY),
)


def _levels(scale: int) -> int:
  if scale not in _LEVELS:
    raise ValueError(f"no official key layout for a {scale}x JBU stack here: only 2x and 4x "
                     f"(JBU8xStack keeps per-level fixup_proj_2x/4x/8x that our stack lacks)")
  return _LEVELS[scale]


def jbu_table(scale: int = 4, prefix: str = UPSAMPLER_PREFIX, ours_prefix: str = "") -> KeyTable:
  """Official key `prefix + up{k}.<...>` / `prefix + fixup_proj.1.*` <-> our `JBUStack` path
  `ours_prefix + up{k}.<...>` / `ours_prefix + fixup_proj.*`."""
  rules = []
  for k in range(1, _levels(scale) + 1):
    rules += [Rule(f"{prefix}up{k}.{t}", f"{ours_prefix}up{k}.{o}", tf)
              for t, o, tf in _LEVEL_RULES]
  # fixup_proj = Sequential(Dropout2d(0.2), Conv2d(C, C, 1)): the conv is index 1.
  rules += [Rule(f"{prefix}fixup_proj.1.weight", f"{ours_prefix}fixup_proj.kernel", CONV1X1_DENSE),
            Rule(f"{prefix}fixup_proj.1.bias", f"{ours_prefix}fixup_proj.bias", IDENTITY)]
  return KeyTable(name=f"JBU{scale}xStack", rules=tuple(rules))


def jbu_shapes(feat_dim: int, scale: int = 4, prefix: str = UPSAMPLER_PREFIX,
               guidance_dim: int = 3, key_dim: int = 32) -> dict[str, tuple[int, ...]]:
  """Official key -> tensor shape of a `JBU{scale}xStack(feat_dim)`, in state-dict order."""
  taps = 49
  level = {"range_temp": (),
           "range_proj.0.weight": (key_dim, guidance_dim, 1, 1), "range_proj.0.bias": (key_dim,),
           "range_proj.3.weight": (key_dim, key_dim, 1, 1), "range_proj.3.bias": (key_dim,),
           "fixup_proj.0.weight": (taps, taps + guidance_dim, 1, 1), "fixup_proj.0.bias": (taps,),
           "fixup_proj.3.weight": (taps, taps, 1, 1), "fixup_proj.3.bias": (taps,),
           "sigma_spatial": ()}
  out = {}
  for k in range(1, _levels(scale) + 1):
    out.update({f"{prefix}up{k}.{name}": shape for name, shape in level.items()})
  out[f"{prefix}fixup_proj.1.weight"] = (feat_dim, feat_dim, 1, 1)
  out[f"{prefix}fixup_proj.1.bias"] = (feat_dim,)
  return out


def jbu_arrays(tensors: Mapping[str, np.ndarray], targets: Mapping[str, tuple[tuple, np.dtype]],
               scale: int = 4, prefix: str = UPSAMPLER_PREFIX,
               where: str = "checkpoint") -> dict[str, np.ndarray]:
  """Official tensors (any superset of the stack's keys; only `prefix*` is looked at) -> our
  arrays for `targets` (`weights.param_targets(stack)`). Raises CheckpointError on a missing,
  unexpected or wrong-shaped key."""
  return to_ours(jbu_table(scale, prefix), KeysUnder(DictSource(tensors), prefix), targets,
                 where=where)


def load_jbu(stack, tensors: Mapping[str, np.ndarray], prefix: str = UPSAMPLER_PREFIX,
             where: str = "checkpoint") -> None:
  """Writes official tensors into a `JBUStack` (in its parameter dtype)."""
  load_params(stack, jbu_arrays(tensors, param_targets(stack), stack.scale, prefix, where))


def export_jbu(stack, prefix: str = UPSAMPLER_PREFIX, dtype=None) -> dict[str, np.ndarray]:
  """A `JBUStack`'s parameters under the official keys (`dtype` casts, e.g. to bfloat16)."""
  return {k: np.asarray(v, order="C")
          for k, v in to_torch(jbu_table(stack.scale, prefix), model_params(stack), dtype)}


# --- torch pickles --------------------------------------------------------------------------------

def _torch():
  try:
    import torch
  except ImportError as e:
    raise CheckpointError("reading or writing a PyTorch .ckpt/.bin pickle needs torch "
                          "(pip install the 'test' extra, or torch==2.13.0 CPU)") from e
  return torch


def _to_numpy(t) -> np.ndarray:
  torch = _torch()
  t = t.detach().cpu()
  if t.dtype == torch.bfloat16:
    import ml_dtypes
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
  return t.numpy().copy()


def _to_tensor(a: np.ndarray):
  torch = _torch()
  a = np.array(a, order="C")  # a writable copy: torch tensors must not alias read-only memory
  if a.dtype.name == "bfloat16":
    return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(a)


def _load_failure(e: Exception) -> str:
  """What torch.load's error means, in a few words. Torch's own text advises re-running with
  `weights_only=False` (arbitrary code execution) and may quote bytes of the file: neither is
  shown."""
  text = str(e)
  refused = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", text)
  if refused:
    name = refused.group(1)[:80]
    return (f"it pickles the object {name}, which a tensor checkpoint never holds (only "
            f"tensors and plain containers are loaded)")
  if isinstance(e, pickle.UnpicklingError):
    return "its pickle stream is not one torch.save writes (not a PyTorch checkpoint)"
  if isinstance(e, EOFError):
    return "the file is empty or truncated"
  if isinstance(e, OSError):
    return e.strerror or type(e).__name__
  return "truncated or corrupt (torch cannot read its archive)"


def read_torch_tensors(path: str | os.PathLike,
                       prefix: str = UPSAMPLER_PREFIX) -> dict[str, np.ndarray]:
  """Tensors of a torch pickle whose key starts with `prefix`, as numpy (bf16 via ml_dtypes).

  Reads a Lightning `.ckpt` (the tensors are its `state_dict`) or a plain state dict such as
  `mm_projector.bin`. Loads with `weights_only=True` (no arbitrary code from the pickle) and,
  for zip-format files, memory-mapped, so the ~300M-parameter featurizer copy in a VDIM
  checkpoint is never read into memory.
  """
  torch = _torch()
  where = os.fspath(path)
  if not os.path.isfile(where):
    raise CheckpointError(f"{where}: no such file")
  try:
    with warnings.catch_warnings():  # torch's pickle-protocol notes are not the user's concern
      warnings.simplefilter("ignore")
      obj = torch.load(where, map_location="cpu", weights_only=True,
                       mmap=zipfile.is_zipfile(where))
  except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
    raise CheckpointError(f"{where}: cannot read it as a PyTorch checkpoint with "
                          f"torch.load(weights_only=True): {_load_failure(e)}") from None
  state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
  if not isinstance(state, Mapping):
    raise CheckpointError(f"{where}: expected a Lightning checkpoint (a dict with 'state_dict') "
                          f"or a state dict, got {type(obj).__name__}")
  out = {k: _to_numpy(v) for k, v in state.items()
         if isinstance(k, str) and k.startswith(prefix) and isinstance(v, torch.Tensor)}
  if not out:
    raise CheckpointError(f"{where}: no tensor key starts with {prefix!r} "
                          f"({len(state)} entries, e.g. {sorted(map(str, state))[:5]})")
  return out


def save_torch_tensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
  """`torch.save` of a plain {key: tensor} dict (the layout of `mm_projector.bin`), atomically."""
  state = {k: _to_tensor(v) for k, v in tensors.items()}
  with outputs.atomic_file(path, "wb") as f:
    _torch().save(state, f)


def write_vdim_ckpt(path: str | os.PathLike, state_dict: Mapping[str, np.ndarray], *,
                    epoch: int = 0, global_step: int = 0) -> None:
  """Saves `state_dict` (key -> numpy array) as a Lightning-layout `.ckpt` with `torch.save`,
  atomically.

  The dict has the keys a Lightning checkpoint of the VDIM pre-training has (with empty
  optimizer and loop states), so `read_torch_tensors` and the official `hubconf` loader, which
  only look at `state_dict`, read it.
  """
  torch = _torch()
  ckpt = {"epoch": epoch, "global_step": global_step,
          "pytorch-lightning_version": LIGHTNING_VERSION,
          "state_dict": {k: _to_tensor(v) for k, v in state_dict.items()},
          "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": []}
  with outputs.atomic_file(path, "wb") as f:
    torch.save(ckpt, f)


def import_vdim(path: str | os.PathLike, precision, feat_dim: int = 1024, scale: int = 4,
                prefix: str = UPSAMPLER_PREFIX, conv_impl: str = "xla"):
  """A `JBUStack` with the weights of a VDIM `.ckpt` (or, with `prefix=MM_PROJECTOR_PREFIX`, of
  an `mm_projector.bin`)."""
  from flax import nnx
  from hiwin_jax.models.jbu import JBUStack

  stack = nnx.eval_shape(lambda: JBUStack(feat_dim, scale=scale, precision=precision,
                                          conv_impl=conv_impl, rngs=nnx.Rngs(0)))
  load_jbu(stack, read_torch_tensors(path, prefix), prefix, where=os.fspath(path))
  return stack
