"""D3SR's losses and discriminator, and the kohya export, against references written here from the formulas."""

import copy
import math

import pytest
import torch

from bounds import RELATIVE_REORDER
from d3sr_core.discriminators import DiffusionDiscriminator, discriminator_lora_targets, sample_timesteps
from d3sr_core.kohya import kohya_unet_lora
from d3sr_core.lora import AdapterSpec, add_adapters, merge_adapters
from d3sr_core.losses import diffuse, ea_dists, gan_discriminator_loss, gan_generator_loss, sobel_edge_map
from d3sr_core.perceptual import DISTS
from tiny_models import tiny_unet


def sobel_reference(plane):
    """Gradient magnitude of one float64 plane (H, W) by explicit sums over the 3x3 window, zero outside."""
    kx = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
    h, w = plane.shape
    out = torch.zeros(h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            gx = gy = 0.0
            for a in range(3):
                for b in range(3):
                    y, x = i + a - 1, j + b - 1
                    if 0 <= y < h and 0 <= x < w:
                        gx += kx[a][b] * float(plane[y, x])
                        gy += kx[b][a] * float(plane[y, x])
            out[i, j] = math.sqrt(gx * gx + gy * gy + 1e-6)
    return out


def test_sobel_edge_map_gray_and_rgb_match_explicit_sums():
    image = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gray = sobel_edge_map(image, "gray")
    assert gray.shape == (2, 1, 7, 9)
    for b in range(2):
        torch.testing.assert_close(gray[b, 0], sobel_reference(image[b].mean(0)), rtol=0, atol=1e-12)
    rgb = sobel_edge_map(image, "rgb")
    assert rgb.shape == (2, 3, 7, 9)
    torch.testing.assert_close(rgb[1, 2], sobel_reference(image[1, 2]), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="channels"):
        sobel_edge_map(image, "luma")


def test_ea_dists_is_dists_of_images_plus_dists_of_edge_maps():
    gen = torch.Generator().manual_seed(1)
    x_hat, x = torch.rand(2, 3, 16, 16, generator=gen), torch.rand(2, 3, 16, 16, generator=gen)

    def mean_abs(a, b):  # any (B,)-valued distance; EA-DISTS must only combine it
        return (a - b).abs().flatten(1).mean(1)

    edges_hat, edges = sobel_edge_map(x_hat), sobel_edge_map(x)
    expected = ((x_hat - x).abs().flatten(1).mean(1) + 0.5 * (edges_hat - edges).abs().flatten(1).mean(1)).mean()
    torch.testing.assert_close(ea_dists(mean_abs, x_hat, x, edge_weight=0.5), expected)

    dists = DISTS(seed=0)
    assert ea_dists(dists, x, x).item() == pytest.approx(0.0, abs=1e-6)
    x_hat.requires_grad_(True)
    loss = ea_dists(dists, x_hat, x)
    loss.backward()
    assert loss.item() > 0 and torch.isfinite(x_hat.grad).all() and x_hat.grad.abs().sum() > 0


def test_gan_losses_match_their_formulas():
    gen = torch.Generator().manual_seed(2)
    real, fake = torch.randn(3, 1, 2, 2, generator=gen, dtype=torch.float64), torch.randn(3, 1, 2, 2, generator=gen, dtype=torch.float64)
    sig = torch.sigmoid
    # Non-saturating (Goodfellow et al. 2014): L_D = -E log D(real) - E log(1 - D(fake)), L_G = -E log D(fake).
    expected_d = -torch.log(sig(real)).mean() - torch.log(1 - sig(fake)).mean()
    torch.testing.assert_close(gan_discriminator_loss(real, fake), expected_d)
    torch.testing.assert_close(gan_generator_loss(fake), -torch.log(sig(fake)).mean())
    # Hinge: E max(0, 1 - real) + E max(0, 1 + fake); generator -E fake.
    expected_hinge = torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean()
    torch.testing.assert_close(gan_discriminator_loss(real, fake, "hinge"), expected_hinge)
    torch.testing.assert_close(gan_generator_loss(fake, "hinge"), -fake.mean())
    # Very confident logits stay finite (softplus form, no log of a saturated sigmoid).
    assert torch.isfinite(gan_discriminator_loss(torch.tensor([80.0]), torch.tensor([-80.0])))
    with pytest.raises(ValueError, match="GAN loss"):
        gan_generator_loss(fake, "wasserstein")


def test_diffuse_is_the_forward_process():
    gen = torch.Generator().manual_seed(3)
    z0, noise = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(2, 4, 3, 3, generator=gen)
    alpha_bar = torch.tensor([0.9, 0.25])
    out = diffuse(z0, noise, alpha_bar)
    torch.testing.assert_close(out[0], math.sqrt(0.9) * z0[0] + math.sqrt(0.1) * noise[0])
    torch.testing.assert_close(out[1], 0.5 * z0[1] + math.sqrt(0.75) * noise[1])


def test_sample_timesteps_range_distribution_and_seed():
    t = sample_timesteps(4000, t_min=10, t_max=20, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and t.min() == 10 and t.max() == 20
    assert set(t.tolist()) == set(range(10, 21))
    same = sample_timesteps(4000, t_min=10, t_max=20, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, same)
    middle = sample_timesteps(4000, t_min=0, t_max=999, distribution="logit_normal", generator=torch.Generator().manual_seed(0))
    assert 0 <= middle.min() and middle.max() <= 999
    assert abs(middle.float().mean().item() - 499.5) < 15 and ((middle > 250) & (middle < 750)).float().mean() > 0.7
    with pytest.raises(ValueError, match="empty"):
        sample_timesteps(1, t_min=5, t_max=4)


def test_discriminator_is_the_unets_encoder_half_with_lora_and_a_patch_head():
    unet = tiny_unet(seed=5)
    reference = copy.deepcopy(unet)
    disc = DiffusionDiscriminator(unet, lora_rank=4, head_hidden_channels=16)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([10, 700])
    context = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(5))

    captured = {}
    reference.mid_block.register_forward_hook(lambda m, i, o: captured.setdefault("mid", o))
    with torch.no_grad():
        reference(latents, t, encoder_hidden_states=context)
        features = disc.features(latents, t, context)
        logits = disc(latents, t, context)
    # LoRA starts as a no-op (B = 0): the features are the pretrained UNet's own mid-block output.
    torch.testing.assert_close(features, captured["mid"], rtol=0, atol=RELATIVE_REORDER * captured["mid"].abs().max().item())
    assert logits.shape == (2, 1, 8, 8)

    targets = discriminator_lora_targets(reference)
    assert targets and all(n.startswith(("down_blocks.", "mid_block.")) for n in targets)
    assert not hasattr(disc, "up_blocks")
    trainable = {n for n, p in disc.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in disc.named_parameters() if ".lora_" in n or n.startswith("head.")}
    assert any(n.startswith("down_blocks.") for n in trainable) and any(n.startswith("mid_block.") for n in trainable)
    disc.set_trainable(False)
    assert not any(p.requires_grad for p in disc.parameters())


def test_kohya_export_applies_to_the_same_weights_as_merging_the_adapters():
    unet = tiny_unet(seed=6)
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    targets_a = ("conv_in", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    targets_b = ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.resnets.0.conv1")
    specs = [AdapterSpec("a", "unet", 2, 8.0, targets_a), AdapterSpec("b", "unet", 3, 3.0, targets_b)]
    add_adapters(unet, specs)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        unet.conv_in.base_layer.weight.add_(0.01)  # a fully trained layer that also has LoRA, as OSEDiff's conv_in
        unet.conv_in.base_layer.bias.add_(0.5)
    tensors = {n.replace(".base_layer.", "."): p.detach().clone() for n, p in unet.named_parameters() if ".lora_" in n}
    tensors["conv_in.weight"] = unet.conv_in.base_layer.weight.detach().clone()
    tensors["conv_in.bias"] = unet.conv_in.base_layer.bias.detach().clone()
    kohya = kohya_unet_lora(tensors, specs, {k: base_state[k] for k in ("conv_in.weight", "conv_in.bias")})
    merge_adapters(unet)
    merged = unet.state_dict()

    # Apply the kohya file the way the hosts do: W + (alpha / rank) * up @ down, plus diff / diff_b.
    applied = {k: v.clone() for k, v in base_state.items()}
    for key in kohya:
        if key.endswith(".lora_down.weight"):
            stem = key[: -len(".lora_down.weight")]
            module = stem[len("lora_unet_"):]
            name = next(n for n in base_state if n.replace(".", "_") == module + "_weight")
            down, up = kohya[key], kohya[stem + ".lora_up.weight"]
            scale = kohya[stem + ".alpha"].item() / down.shape[0]
            applied[name] += scale * (up.flatten(1) @ down.flatten(1)).view(applied[name].shape)
    applied["conv_in.weight"] += kohya["lora_unet_conv_in.diff"]
    applied["conv_in.bias"] += kohya["lora_unet_conv_in.diff_b"]
    # One patch per layer: conv_in's LoRA is folded into its difference (hosts apply a single patch per weight).
    assert set(k.rsplit(".", 2)[0] for k in kohya if ".lora_" in k) == {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "lora_unet_mid_block_resnets_0_conv1"
    }
    assert kohya["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape[0] == 5
    for name, value in merged.items():
        torch.testing.assert_close(applied[name], value, rtol=0, atol=1e-5, msg=name)
