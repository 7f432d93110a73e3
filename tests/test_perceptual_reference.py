"""Our DISTS, LPIPS-VGG and LPIPS-Alex against the reference implementations themselves: the ``lpips`` wheel's
``lpips.LPIPS`` and the ``dists-pytorch`` wheel's ``DISTS_pytorch.DISTS``, run on the same weights.

The learned heads are the real ones, read from the wheels' own files by both sides. No ImageNet trunk is on disk
(reference/offline.md), so the trunks are torchvision's networks at a fixed random init, written to a file under
torchvision's name and read back by our loader: the comparison covers the loaders, the trunks' layer indices, the
normalisations, the pooling and the formulas, with nothing shared between the two sides but the numbers.
"""

import sys
import warnings
from pathlib import Path

import pytest
import torch

from d3sr_core.perceptual import ALEXNET_FILE, DISTS, DISTS_FILES, LPIPS, VGG16_FILE, LPIPSAlex

lpips = pytest.importorskip("lpips", reason="the lpips wheel is part of the [dev] extra")
torchvision = pytest.importorskip("torchvision")


def _images(seed: int, size: int = 64, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=g)
    # y: x plus structured noise, so that the distances are neither 0 nor saturated.
    y = (x + 0.15 * torch.randn(batch, 3, size, size, generator=g)).clamp(0, 1)
    return x, y


def _lpips_reference(net: str, tmp_path: Path, trunk_file: str) -> "lpips.LPIPS":
    """``lpips.LPIPS`` with the wheel's heads and a random trunk, whose weights are also written to ``tmp_path``
    under torchvision's file name and key layout (``features.N.*``), and the wheel's head file beside it."""
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation of ``pretrained=``
        reference = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False).eval()
    # lpips keeps torchvision's indices inside its slices: net.slice{k}.{N}.weight is features.N.weight.
    trunk = {
        "features." + key.split(".", 2)[2]: value.clone()
        for key, value in reference.state_dict().items()
        if key.startswith("net.slice")
    }
    torch.save(trunk, tmp_path / trunk_file)
    head = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"
    (tmp_path / f"{net}.pth").write_bytes(head.read_bytes())
    return reference


@pytest.mark.parametrize("net, ours_class, trunk_file", [("alex", LPIPSAlex, ALEXNET_FILE), ("vgg", LPIPS, VGG16_FILE)])
def test_lpips_equals_the_lpips_wheel_on_the_same_weights(tmp_path, monkeypatch, net, ours_class, trunk_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    reference = _lpips_reference(net, tmp_path, trunk_file)
    ours = ours_class.from_files([tmp_path])
    x, y = _images(1)
    with torch.no_grad():
        expected = reference(x * 2 - 1, y * 2 - 1).flatten()  # lpips takes [-1, 1], as ours
        got = ours(x * 2 - 1, y * 2 - 1)
    assert expected.min() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # The heads matter: with random ones the distance is another number.
    random_heads = ours_class(seed=3)
    random_heads._trunk().load_state_dict(ours._trunk().state_dict())
    assert (random_heads(x * 2 - 1, y * 2 - 1) - expected).abs().min() > 1e-3


def test_lpips_alex_refuses_images_its_trunk_cannot_see_and_names_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    x = torch.zeros(1, 3, 30, 64)
    with pytest.raises(ValueError, match="smaller than 31 x 31"):
        LPIPSAlex(seed=0)(x, x)
    with pytest.raises(Exception, match=ALEXNET_FILE) as err:
        LPIPSAlex.from_files([tmp_path])
    assert "AlexNet" in str(err.value) and "\n" not in str(err.value)


def test_dists_equals_the_dists_pytorch_wheel_on_the_same_weights(tmp_path, monkeypatch):
    dists_pt = pytest.importorskip("DISTS_pytorch.DISTS_pt", reason="the dists-pytorch wheel is part of the [dev] extra")
    weights = Path(sys.prefix) / "weights.pt"  # where the wheel installs its alpha and beta (DISTS_pt reads it there)
    if not weights.is_file():
        pytest.skip(f"the dists-pytorch wheel's weights are not at {weights}")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    torch.manual_seed(12)
    vgg = torchvision.models.vgg16(weights=None)
    # DISTS_pt asks torchvision for the ImageNet VGG16 (a download); it gets this random one instead.
    monkeypatch.setattr(dists_pt.models, "vgg16", lambda *args, **kwargs: vgg)
    reference = dists_pt.DISTS().eval()
    torch.save({f"features.{k}": v for k, v in vgg.features.state_dict().items()}, tmp_path / VGG16_FILE)
    ours = DISTS.from_files([tmp_path, weights.parent])
    assert DISTS_FILES[1] == weights.name
    x, y = _images(2)
    with torch.no_grad():
        expected = reference(x, y, batch_average=False)
        got = ours(x, y)
    assert expected.min() > 1e-3
    # The reference computes covariances as E[xy] - mu_x mu_y in float32, ours centred first: rounding only.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert (DISTS(seed=4)(x, y) - expected).abs().min() > 1e-3
