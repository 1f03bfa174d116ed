"""FeatUp's JBU upsampler as LLaVA-UHD v2 runs it (`JBU4xStack.forward_with_internal_features`,
official-spec §3.2-3.6), in PyTorch, NCHW, eval mode.

Written from the spec in FeatUp's style: `F.unfold` for the 49 range taps, `F.interpolate`
bicubic, `F.adaptive_avg_pool2d`, `F.pad` reflect, exact GELU, the adaptive convolution of §3.4.
The functions take a state dict in the official layout without prefix (`up1.range_temp`,
`up1.range_proj.0.weight`, ..., `fixup_proj.1.weight`; spec §8.2); `JBU4xStack` holds such
parameters as a module (random FeatUp init) for the benchmarks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def adaptive_conv(up: torch.Tensor, kernel: torch.Tensor, impl: str = "unfold") -> torch.Tensor:
  """FeatUp's AdaptiveConv (spec §3.4): out[b, c, y, x] = sum over a, b' of
  kernel[b, 7a + b', y, x] * up[b, c, y + a, x + b'].

  up (B, C, H + 6, W + 6), kernel (B, 49, H, W) -> (B, C, H, W). impl "unfold": FeatUp's
  pure-PyTorch fallback (`F.unfold`: 49 copies of the map, one sample at a time to bound them);
  "shift": the 49 shifted slices accumulated (memory-lean); "fma": the official CUDA kernel's
  summation order and roundings (for bit-level comparisons)."""
  b, _, h, w = kernel.shape
  if impl == "unfold":
    return torch.cat([
        torch.einsum("bcphw,bphw->bchw",
                     F.unfold(up[i:i + 1], 7).reshape(1, up.shape[1], 49, h, w), kernel[i:i + 1])
        for i in range(b)])
  if impl == "fma":
    # The official CUDA kernel's arithmetic: taps row by row, `sum += x * w` in float32, which
    # nvcc compiles to a fused multiply-add (one rounding per tap). Emulated in float64: the
    # product of two float32 values is exact there, the sum is rounded to float32 once.
    out = torch.zeros(up.shape[0], up.shape[1], h, w, dtype=torch.float32)
    for a in range(7):
      for c in range(7):
        term = up[:, :, a:a + h, c:c + w].double() * kernel[:, 7 * a + c:7 * a + c + 1].double()
        out = (out.double() + term).float()
    return out
  if impl != "shift":
    raise ValueError(f"adaptive_conv impl {impl!r}: choose 'unfold', 'shift' or 'fma'")
  out = 0
  for a in range(7):
    for c in range(7):
      out = out + up[:, :, a:a + h, c:c + w] * kernel[:, 7 * a + c:7 * a + c + 1]
  return out


def softmax_taps(logits: torch.Tensor) -> torch.Tensor:
  """`F.softmax(logits, dim=1)` over the 49 taps, every position computed as torch's vectorised
  CPU kernel computes it: exp and sum in float32, the quotient rounded once to the logits' dtype.

  torch's bf16 softmax over a non-last dim on CPU handles the positions past the last full
  vector of each row (16 or 32 wide, by instruction set and thread split) in a scalar loop that
  rounds each exp to bf16 before dividing: a CPU artifact, which changes ~2% of the JBU's bf16
  range kernel at these sizes (BUILD_NOTES "Fidelity per release"), and is not what the official
  GPU run computes. In float32 the two rules are the same."""
  return F.softmax(logits.float(), dim=1).to(logits.dtype)


def _conv1x1(x, sd, name):
  # torch's CPU convolution adds the bias to the float32 accumulator (a bf16 output is rounded
  # once); cuDNN, which ran the official bf16 training, adds it after the bf16 convolution output.
  return F.conv2d(x, sd[name + ".weight"], sd[name + ".bias"])


def jbu_step(source, guidance, sd, dt=torch.float32, conv: str = "unfold"):
  """One JBULearnedRange, spec §3.3: source (B,C,h,w), guidance (B,3,2h,2w) -> (B,C,2h,2w) fp32.

  `dt` = bfloat16 follows the official bf16 projector (§3.6): inputs and weights in bf16, the
  spatial kernel and the normalisation in fp32 by type promotion, the kernel MLP in bf16, the
  convolution in fp32. `conv` is `adaptive_conv`'s impl."""
  b, _, gh, gw = guidance.shape
  source, guidance = source.to(dt), guidance.to(dt)
  sd = {k: v.to(dt) for k, v in sd.items()}
  keys = _conv1x1(F.gelu(_conv1x1(guidance, sd, "range_proj.0")), sd, "range_proj.3")
  neighbours = F.unfold(F.pad(keys, [3] * 4, mode="reflect"), 7).reshape(b, -1, 49, gh, gw)
  tau = sd["range_temp"].exp().clamp(1e-4, 1e4)
  rng = softmax_taps(tau * torch.einsum("bcphw,bchw->bphw", neighbours, keys))
  t = torch.linspace(-1, 1, 7, device=source.device)
  ta, tb = torch.meshgrid(t, t, indexing="ij")
  spatial = torch.exp(-(ta ** 2 + tb ** 2) / (2 * sd["sigma_spatial"] ** 2)).reshape(1, 49, 1, 1)
  kernel = rng * spatial
  kernel = kernel / kernel.sum(1, keepdim=True).clamp(min=1e-7)
  fix_in = torch.cat([kernel, guidance], dim=1).to(dt)
  kernel = kernel + 0.1 * _conv1x1(F.gelu(_conv1x1(fix_in, sd, "fixup_proj.0")), sd, "fixup_proj.3")
  up = F.interpolate(source, size=(gh, gw), mode="bicubic", align_corners=False)
  up = F.pad(up, [3] * 4, mode="reflect").to(torch.float32)
  return adaptive_conv(up, kernel.to(torch.float32), conv)


def jbu4x(source, pixels, sd, dt=torch.float32, conv: str = "unfold"):
  """JBU4xStack.forward_with_internal_features, spec §3.2 (eval mode): source (B,C,h,w), pixels
  (B,3,14h,14w) -> (feat2x (B,C,2h,2w), feat4x (B,C,4h,4w)) in `dt`."""
  h, w = source.shape[-2:]
  source, pixels = source.to(dt), pixels.to(dt)
  sub = lambda p: {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
  f2 = jbu_step(source, F.adaptive_avg_pool2d(pixels, (2 * h, 2 * w)), sub("up1."), dt,
                conv).to(dt)
  f4p = jbu_step(f2, F.adaptive_avg_pool2d(pixels, (4 * h, 4 * w)), sub("up2."), dt,
                 conv).to(dt)
  fix = _conv1x1(f4p, {k: v.to(dt) for k, v in sd.items()}, "fixup_proj.1")
  return f2, fix * 0.1 + f4p


class _StepParams(nn.Module):
  """One JBULearnedRange's parameters (guidance 3 channels, keys 32, radius 3), FeatUp's init."""

  def __init__(self):
    super().__init__()
    self.range_temp = nn.Parameter(torch.tensor(0.0))
    self.sigma_spatial = nn.Parameter(torch.tensor(1.0))
    self.range_proj = nn.ModuleDict({"0": nn.Conv2d(3, 32, 1), "3": nn.Conv2d(32, 32, 1)})
    self.fixup_proj = nn.ModuleDict({"0": nn.Conv2d(52, 49, 1), "3": nn.Conv2d(49, 49, 1)})


class JBU4xStack(nn.Module):
  """The stack's parameters in the official layout (its Dropout2d layers are left out: eval
  mode); `forward` is `jbu4x` on them. channels C = the ViT width."""

  def __init__(self, channels: int, conv: str = "unfold"):
    super().__init__()
    self.conv = conv
    self.up1, self.up2 = _StepParams(), _StepParams()
    self.fixup_proj = nn.ModuleDict({"1": nn.Conv2d(channels, channels, 1)})

  def forward(self, source, pixels):
    """source (B,C,h,w), pixels (B,3,14h,14w) -> (feat2x, feat4x), fp32."""
    return jbu4x(source, pixels, dict(self.named_parameters()), conv=self.conv)
