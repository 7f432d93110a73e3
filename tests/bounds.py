"""The tolerances of the suite, each derived from a stated bound that holds on any x86 CPU.

Where a test compares two float32 computations that are equal in exact arithmetic (a batch against its images one by
one, merged against unmerged LoRA, one VAE tile against the whole VAE, our forward against an independent
reference), they differ only by rounding, and the rounding depends on the CPU: oneDNN and MKL choose convolution and
GEMM kernels by SIMD width (SSE4, AVX2, AVX-512, AMX) and by batch size, so the order in which the same terms are
summed changes from one machine to another. Wilkinson's bound for one sum of ``n`` float32 terms,
``|fl(s) - s| <= gamma_n * sum|x_i|`` with ``gamma_n ~ n * u`` and ``u = 2**-24``, grows along the network's
depth, so it cannot be written down tight for a random tiny model; instead each bound below is stated in the units
of the quantity compared and is set well above every summation order yet well below any bug the tests guard against.
"""

U = 2.0**-24
"""float32 unit roundoff."""

IMAGE_REORDER = 2.0**-12
"""Images in [0, 1] from two float32 passes of the tiny models that differ only in summation order: 2**-12
(2.4e-4), a sixteenth of one 8-bit level, so the two round to the same 8-bit value away from rounding boundaries.
Measured: 1.5e-5 worst on an AVX-512 CPU (1.47e-5, batch against one by one), a 16x margin. The
bugs these tests guard against (a wrong image in the batch, a lost LoRA, a misplaced tile) move pixels by 1e-2 or
more, 40x above it; tests that can, check that their change matters by more than ``MATTERS``."""

ACTIVATION_REORDER = 2.0**-12
"""Activations of magnitude up to about 4 (VAE moments and decoder outputs of the tiny models) from two float32
passes that differ in summation order or in how GroupNorm statistics are summed (per tile, then combined): the same
2**-12; measured up to 6e-6."""

RELATIVE_REORDER = 2.0**-16
"""Tensors of any magnitude (latents, x0, UNet features: up to about 60 for the tiny models) from two float32 passes
that differ only in summation order, as a fraction of the largest magnitude compared: 2**-16 (1.5e-5, 256 units of
roundoff ``U``). Measured: 7e-8 (about 1 ``U``; 3.8e-6 at magnitude 56) for the tiled x0 against the official
loop's, 0 for the discriminator's mid-block features. A misplaced tile or a feature from the wrong block moves values
by a large fraction of their magnitude."""

MATTERS = 1e-2
"""What a change that a comparison must detect moves an image in [0, 1] by at least."""


def max_difference(a, b) -> float:
    """``max |a - b|`` of two tensors, as a Python float (for assertion messages)."""
    return (a.float() - b.float()).abs().max().item()
