"""Generative networks of the published purifiers, written to load their authors' checkpoints.

- :mod:`defenses.networks.ncsnpp`: the score-SDE NCSN++ (Song et al., ICLR 2021,
  arXiv 2011.13456) in its DDPM++ "deep continuous" configuration (DiffPure's and COUP's
  CIFAR-10 score model, ``checkpoint_8.pth``) and the NCSN++ of the CIFAR-10 consistency
  model (CMAP), with their checkpoint loaders.
- :mod:`defenses.networks.layers`: its building blocks (FIR resampling as a native op,
  BigGAN residual blocks, attention, time embeddings).

Nothing here is a defense and nothing is registered: :mod:`defenses` imports this package
with the defense plugins, so it imports no submodule (and no weights) by itself.
"""
