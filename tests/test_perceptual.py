"""DISTS and LPIPS-VGG against independent float64 computations, on random backbones and small images."""

import numpy as np
import pytest
import torch

from d3sr_core.perceptual import (
    DISTS,
    DISTS_FILES,
    LPIPS,
    LPIPS_VGG_FILES,
    VGG16_FILE,
    L2Pooling,
    PerceptualWeightsMissing,
    dists_structure_texture,
    find_weight_file,
)

TORCHVISION_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256),
                     14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512),
                     26: (512, 512), 28: (512, 512)}
"""The convolutions of torchvision's ``vgg16().features`` (index: in, out channels), written out independently."""


@pytest.fixture(scope="module")
def dists() -> DISTS:
    return DISTS(seed=0)


@pytest.fixture(scope="module")
def lpips() -> LPIPS:
    return LPIPS(seed=0)


def images(seed: int, batch: int = 2, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g), torch.rand(batch, 3, size, size, generator=g)


def torchvision_style_vgg16(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for index, (cin, cout) in TORCHVISION_CONVS.items():
        state[f"features.{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2 / (9 * cin)) ** 0.5
        state[f"features.{index}.bias"] = torch.randn(cout, generator=g) * 0.01
    state["classifier.0.bias"] = torch.randn(4096, generator=g)  # present in the real file, must be ignored
    state["classifier.6.bias"] = torch.randn(1000, generator=g)
    return state


def test_l2_pooling_matches_an_explicit_loop():
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    window = np.array([[0.25, 0.5, 0.25], [0.5, 1.0, 0.5], [0.25, 0.5, 0.25]]) / 4
    xs = x.numpy()
    padded = np.zeros((2, 3, 9, 8))
    padded[:, :, 1:-1, 1:-1] = xs
    out_h, out_w = (7 - 1) // 2 + 1, (6 - 1) // 2 + 1
    expected = np.zeros((2, 3, out_h, out_w))
    for b in range(2):
        for c in range(3):
            for i in range(out_h):
                for j in range(out_w):
                    acc = 0.0
                    for di in range(3):
                        for dj in range(3):
                            acc += window[di, dj] * padded[b, c, 2 * i + di, 2 * j + dj] ** 2
                    expected[b, c, i, j] = np.sqrt(acc + 1e-12)
    ours = L2Pooling(3).double()(x)
    assert ours.shape == (2, 3, out_h, out_w)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-12, atol=1e-12)


def dists_reference(feats_x, feats_y, alpha, beta) -> np.ndarray:
    """1 - sum_ij alpha_ij l_ij + beta_ij s_ij, with plain loops over images, stages and channels."""
    alpha, beta = np.asarray(alpha, np.float64).ravel(), np.asarray(beta, np.float64).ravel()
    total = alpha.sum() + beta.sum()
    batch = feats_x[0].shape[0]
    out = np.zeros(batch)
    for b in range(batch):
        similarity, offset = 0.0, 0
        for fx, fy in zip(feats_x, feats_y):
            for j in range(fx.shape[1]):
                u = np.asarray(fx[b, j], np.float64).ravel()
                v = np.asarray(fy[b, j], np.float64).ravel()
                mu_u, mu_v = u.mean(), v.mean()
                var_u, var_v = ((u - mu_u) ** 2).mean(), ((v - mu_v) ** 2).mean()
                cov = ((u - mu_u) * (v - mu_v)).mean()
                texture = (2 * mu_u * mu_v + 1e-6) / (mu_u**2 + mu_v**2 + 1e-6)
                structure = (2 * cov + 1e-6) / (var_u + var_v + 1e-6)
                similarity += (alpha[offset + j] * texture + beta[offset + j] * structure) / total
            offset += fx.shape[1]
        out[b] = 1 - similarity
    return out


def test_dists_structure_texture_matches_the_paper_formulas():
    g = torch.Generator().manual_seed(1)
    shapes = [(2, 3, 8, 8), (2, 4, 4, 4), (2, 5, 2, 3)]
    feats_x = [torch.rand(s, generator=g, dtype=torch.float64) for s in shapes]
    feats_y = [torch.rand(s, generator=g, dtype=torch.float64) for s in shapes]
    alpha = torch.rand(1, 12, 1, 1, generator=g, dtype=torch.float64)
    beta = torch.rand(1, 12, 1, 1, generator=g, dtype=torch.float64)
    ours = dists_structure_texture(feats_x, feats_y, alpha, beta)
    expected = dists_reference([f.numpy() for f in feats_x], [f.numpy() for f in feats_y], alpha.numpy(), beta.numpy())
    assert ours.shape == (2,)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="12 weights each"):
        dists_structure_texture(feats_x, feats_y, alpha[:, :11], beta)


def test_dists_features_are_the_image_and_five_l2_pooled_stages(dists):
    x, _ = images(2)
    feats = dists.features(x)
    assert feats[0] is x
    assert [tuple(f.shape) for f in feats[1:]] == [(2, 64, 16, 16), (2, 128, 8, 8), (2, 256, 4, 4),
                                                   (2, 512, 2, 2), (2, 512, 1, 1)]
    assert all(isinstance(dists.vgg[i], L2Pooling) for i in (4, 9, 16, 23))
    assert all(p.requires_grad is False for p in dists.parameters()) and not dists.training
    assert 0.05 < dists.alpha.mean().item() < 0.15  # N(0.1, 0.01^2), as the reference code draws them


def test_dists_is_zero_on_equal_images_positive_otherwise_and_differentiable(dists):
    x, y = images(3)
    same = dists(x, x.clone())
    assert same.shape == (2,) and same.abs().max().item() < 1e-6
    x = x.requires_grad_(True)
    distance = dists(x, y)
    assert distance.shape == (2,) and (distance > 0).all()
    distance.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in dists.parameters())


def test_dists_rejects_bad_input(dists):
    x, y = images(4)
    with pytest.raises(ValueError, match="differ in shape or are smaller"):
        dists(x, y[:, :, :8])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        dists(x[:, :1], y[:, :1])


def test_dists_from_files_loads_torchvision_and_pyiqa_files(tmp_path, monkeypatch, dists):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    vgg_state = torchvision_style_vgg16(5)
    torch.save(vgg_state, tmp_path / VGG16_FILE)
    g = torch.Generator().manual_seed(6)
    head = {key: torch.rand(1, 1475, 1, 1, generator=g) * 0.02 for key in ("alpha", "beta")}
    torch.save(head, tmp_path / DISTS_FILES[0])

    loaded = DISTS.from_files([tmp_path])
    by_hand = DISTS(seed=1)
    for index in TORCHVISION_CONVS:
        by_hand.vgg[index].weight.data.copy_(vgg_state[f"features.{index}.weight"])
        by_hand.vgg[index].bias.data.copy_(vgg_state[f"features.{index}.bias"])
    by_hand.alpha.data.copy_(head["alpha"])
    by_hand.beta.data.copy_(head["beta"])
    x, y = images(7, batch=1)
    ours = loaded(x, y)
    assert torch.equal(ours, by_hand(x, y))
    assert not torch.equal(ours, dists(x, y))


def test_from_files_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    torch.save(torchvision_style_vgg16(8), tmp_path / VGG16_FILE)
    with pytest.raises(PerceptualWeightsMissing, match=DISTS_FILES[0]) as err:
        DISTS.from_files([tmp_path])
    message = str(err.value)
    assert "alpha" in message and "dists-pytorch" in message  # what the file is and where it comes from
    assert str(tmp_path) in message and str(tmp_path / "empty_torch_home" / "hub" / "pyiqa") in message
    assert message.endswith(".") and "\n" not in message
    with pytest.raises(PerceptualWeightsMissing, match=VGG16_FILE):
        LPIPS.from_files([tmp_path / "nowhere"])


def test_find_weight_file_searches_the_torch_hub_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    pyiqa_dir = tmp_path / "hub" / "pyiqa"
    pyiqa_dir.mkdir(parents=True)
    (pyiqa_dir / LPIPS_VGG_FILES[0]).write_bytes(b"x")
    assert find_weight_file(LPIPS_VGG_FILES, None) == pyiqa_dir / LPIPS_VGG_FILES[0]
    first = tmp_path / "mine"
    first.mkdir()
    (first / "vgg.pth").write_bytes(b"x")
    assert find_weight_file(LPIPS_VGG_FILES, [first]) == first / "vgg.pth"


def lpips_reference(lpips: LPIPS, feats_x: list[torch.Tensor], feats_y: list[torch.Tensor]) -> np.ndarray:
    """Zhang et al. eq. 1 in float64 from the module's trunk features: unit-normalise, square, weight, average, sum."""
    out = np.zeros(feats_x[0].shape[0])
    for fx, fy, lin in zip(feats_x, feats_y, lpips.lins):
        fx, fy = fx.double().numpy(), fy.double().numpy()
        w = lin.weight.double().numpy().reshape(-1)
        nx = fx / (np.sqrt((fx**2).sum(axis=1, keepdims=True)) + 1e-10)
        ny = fy / (np.sqrt((fy**2).sum(axis=1, keepdims=True)) + 1e-10)
        weighted = np.einsum("bchw,c->bhw", (nx - ny) ** 2, w)
        out += weighted.mean(axis=(1, 2))
    return out


def test_lpips_scaling_layer_and_the_formula(lpips):
    x, y = images(9)
    x, y = 2 * x - 1, 2 * y - 1
    shift, scale = torch.tensor([-0.030, -0.088, -0.188]), torch.tensor([0.458, 0.448, 0.450])
    expected_input = (x - shift.view(1, 3, 1, 1)) / scale.view(1, 3, 1, 1)
    feats_x, feats_y = lpips.features(x), lpips.features(y)
    assert torch.allclose(feats_x[0], lpips.vgg[:4](expected_input), atol=1e-6)
    assert all(isinstance(lpips.vgg[i], torch.nn.MaxPool2d) for i in (4, 9, 16, 23))
    ours = lpips(x, y)
    assert ours.shape == (2,) and (ours > 0).all()
    np.testing.assert_allclose(ours.numpy(), lpips_reference(lpips, feats_x, feats_y), rtol=1e-5)
    assert lpips(x, x.clone()).abs().max().item() == 0


def test_lpips_gradient_reaches_the_input(lpips):
    x, y = images(10)
    x = (2 * x - 1).requires_grad_(True)
    lpips(x, 2 * y - 1).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in lpips.parameters())
    with pytest.raises(ValueError, match="smaller than 16 x 16"):
        lpips(x[:, :, :8, :8], x[:, :, :8, :8])


def test_lpips_from_files_reads_the_lpips_wheel_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    vgg_state = torchvision_style_vgg16(11)
    torch.save(vgg_state, tmp_path / VGG16_FILE)
    g = torch.Generator().manual_seed(12)
    channels = (64, 128, 256, 512, 512)
    heads = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) * 0.05 for k, c in enumerate(channels)}
    torch.save(heads, tmp_path / "vgg.pth")

    loaded = LPIPS.from_files([tmp_path])
    for k, lin in enumerate(loaded.lins):
        assert torch.equal(lin.weight, heads[f"lin{k}.model.1.weight"])
    assert torch.equal(loaded.vgg[28].weight, vgg_state["features.28.weight"])
    x, y = images(13, batch=1)
    x, y = 2 * x - 1, 2 * y - 1
    expected = lpips_reference(loaded, loaded.features(x), loaded.features(y))
    np.testing.assert_allclose(loaded(x, y).numpy(), expected, rtol=1e-5)

    del heads["lin3.model.1.weight"]
    torch.save(heads, tmp_path / "vgg.pth")
    with pytest.raises(ValueError, match="lin3.model.1.weight"):
        LPIPS.from_files([tmp_path])
