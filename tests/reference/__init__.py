"""Independent PyTorch/numpy references of the official LLaVA-UHD v2 computation, one module per
concept, written from docs/official-spec.md (not from our code): the tests compare our modules
with them, the benchmarks time them against ours.

  roi_align   RoIAlign and the Hiwin window boxes (spec §4.4), numpy
  hiwin       the Hiwin projector (spec §4.3-4.5), PyTorch
  jbu         the JBU upsampler and its adaptive convolution (spec §3.2-3.6), PyTorch
  clip        the CLIP ViT features at any patch grid (spec §2.2), PyTorch
  layout      the image token organisation (spec §5), plain Python
  llava_uhd   the composition: vision path (§2-§4), image spans (§5), splice (§6.3), PyTorch
  slicing     the slicing plan (spec §1.2-1.3), plain Python
  checkpoint  the official checkpoint's keys and config.json (spec §8.2-8.4)

The PyTorch modules import torch at the top: import them after `pytest.importorskip("torch")`
(or inside a test that takes the `torch` fixture of tests/conftest.py).
"""
