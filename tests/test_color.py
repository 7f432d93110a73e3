"""Colour fixes against their formulas on small hand-made cases."""

import pytest
import torch

from d3sr_core.color import adain_color_fix, apply_color_fix, wavelet_blur, wavelet_color_fix, wavelet_decomposition


def test_adain_hand_case():
    content = torch.tensor([0.1, 0.3, 0.5, 0.7]).reshape(1, 1, 2, 2)
    source = torch.tensor([0.4, 0.5, 0.6, 0.5]).reshape(1, 1, 2, 2)
    # content: mean 0.4, unbiased var 0.0666..; source: mean 0.5, unbiased var 0.00666..
    c_std = (0.2 / 3 + 1e-5) ** 0.5
    s_std = (0.02 / 3 + 1e-5) ** 0.5
    expected = [(v - 0.4) / c_std * s_std + 0.5 for v in (0.1, 0.3, 0.5, 0.7)]
    assert adain_color_fix(content, source).flatten().tolist() == pytest.approx(expected, abs=1e-6)


def test_adain_gives_source_statistics_per_channel():
    gen = torch.Generator().manual_seed(0)
    content = torch.rand(2, 3, 16, 16, generator=gen) * 0.5
    source = 0.3 + torch.rand(2, 3, 16, 16, generator=gen) * 0.4
    out = adain_color_fix(content, source)
    assert torch.allclose(out.mean(dim=(2, 3)), source.mean(dim=(2, 3)), atol=1e-5)
    assert torch.allclose(out.std(dim=(2, 3)), source.std(dim=(2, 3)), atol=1e-3)


def test_wavelet_blur_hand_case():
    # A single bright pixel spreads as the kernel [[1,2,1],[2,4,2],[1,2,1]]/16, placed with dilation 2.
    image = torch.zeros(1, 1, 7, 7)
    image[0, 0, 3, 3] = 16.0
    out = wavelet_blur(image.expand(1, 3, 7, 7).contiguous(), radius=2)[0, 0]
    assert out[3, 3].item() == pytest.approx(4.0)
    assert out[1, 3].item() == pytest.approx(2.0) and out[3, 5].item() == pytest.approx(2.0)
    assert out[1, 1].item() == pytest.approx(1.0)
    assert out[2, 3].item() == 0.0 and out.sum().item() == pytest.approx(16.0)


def test_wavelet_decomposition_sums_back_and_low_is_constant_on_flat_image():
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 40, 40, generator=gen)
    high, low = wavelet_decomposition(image)
    assert torch.allclose(high + low, image, atol=1e-6)
    flat = torch.full((1, 3, 20, 20), 0.42)
    assert torch.allclose(wavelet_decomposition(flat)[1], flat)


def test_wavelet_color_fix_takes_low_frequencies_from_source():
    gen = torch.Generator().manual_seed(2)
    content = torch.rand(1, 3, 32, 32, generator=gen) * 0.2 + 0.4
    source = torch.full((1, 3, 32, 32), 0.7)
    out = wavelet_color_fix(content, source)
    high, _ = wavelet_decomposition(content)
    assert torch.allclose(out, (high + 0.7).clamp(0, 1), atol=1e-6)
    assert abs(out.mean().item() - 0.7) < 0.01


def test_none_and_unknown():
    x = torch.rand(1, 3, 4, 4)
    assert apply_color_fix("none", x, x * 0) is x
    with pytest.raises(ValueError, match="color fix 'lab' is not one of"):
        apply_color_fix("lab", x, x)


def test_adain_of_a_single_pixel_is_finite():
    out = adain_color_fix(torch.full((1, 3, 1, 1), 0.3), torch.full((1, 3, 1, 1), 0.6))
    assert torch.allclose(out, torch.full((1, 3, 1, 1), 0.6))


def test_reference_batch_must_be_one_or_match():
    from d3sr_core.color import color_fix_to_reference

    image = torch.rand(3, 3, 8, 8)
    assert color_fix_to_reference("adain", image, torch.rand(1, 3, 4, 4)).shape == image.shape
    with pytest.raises(ValueError, match="reference batch has 2 images; expected 1 or as many as the image batch"):
        color_fix_to_reference("adain", image, torch.rand(2, 3, 8, 8))
