"""Fast operators that know nothing of capsules: what ``layers/`` and ``routing/`` call for speed.

* :mod:`~capsnet.ops.conv`: ``conv2d`` (the per-call choice of algorithm) and ``Conv2d``, a drop-in
  ``nn.Conv2d`` over it with faster CPU algorithms;
* :mod:`~capsnet.ops.dft`: convolution as a bilinear algorithm over the DFT (PrimaryCaps);
* :mod:`~capsnet.ops.kernels`: compiled C kernels: the reads of EM routing's factored votes and its M-step
  (``em_votes.c``), and DigitCaps' routing without gradients (``dense_routing.c``).
"""
