"""Tiny ResShift models in the official layouts: a config written as the official YAML is (sections with ``target`` and
``params``, an OmegaConf ``${...}`` reference), UNet and VQ state dicts under the official key names, which are
enumerated here from the official ``models/unet.py``, ``models/swin_transformer.py`` and
``ldm/modules/diffusionmodules/model.py`` rules, independently of the code under test."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_MODEL = dict(
    image_size=16, in_channels=3, model_channels=32, out_channels="${autoencoder.params.embed_dim}",
    attention_resolutions=[16, 8], dropout=0, channel_mult=[1, 2], num_res_blocks=[1, 1], conv_resample=True,
    dims=2, use_fp16=False, num_head_channels=16, use_scale_shift_norm=True, resblock_updown=False, swin_depth=2,
    swin_embed_dim=32, window_size=4, mlp_ratio=2, cond_lq=True, lq_size=16,
)
TINY_DIFFUSION = dict(
    sf=4, schedule_name="exponential", schedule_kwargs={"power": 0.3}, etas_end=0.99, steps=15, min_noise_level=0.04,
    kappa=2.0, weighted_mse=False, predict_type="xstart", timestep_respacing=None, scale_factor=1.0,
    normalize_input=True, latent_flag=True,
)
TINY_AUTOENCODER = dict(
    embed_dim=3, n_embed=64,
    ddconfig=dict(double_z=False, z_channels=3, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2],
                  num_res_blocks=1, attn_resolutions=[], dropout=0.0, padding_mode="zeros"),
)


def write_tiny_config(path: Path, steps: int = 15) -> Path:
    import yaml

    raw = {
        "trainer": {"target": "trainer.TrainerDifIR"},
        "model": {"target": "models.unet.UNetModelSwin", "ckpt_path": None, "params": TINY_MODEL},
        "diffusion": {"target": "models.script_util.create_gaussian_diffusion", "params": dict(TINY_DIFFUSION, steps=steps)},
        "autoencoder": {"target": "ldm.models.autoencoder.VQModelTorch", "ckpt_path": "weights/autoencoder_vq_f4.pth",
                        "use_fp16": True, "params": TINY_AUTOENCODER},
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def official_unet_shapes(p: dict) -> dict[str, tuple]:
    """Name -> shape of every tensor an official ``UNetModelSwin`` state dict holds (parameters and the persistent
    Swin buffers), for the SR layout (lq concatenated, no resblock up/down, no patch norm)."""
    shapes: dict[str, tuple] = {}
    mc, temb = p["model_channels"], p["model_channels"] * 4
    embed, window, heads = p["swin_embed_dim"], p["window_size"], p["swin_embed_dim"] // p["num_head_channels"]
    out_channels = p["in_channels"]

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def linear(name, cin, cout):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resblock(name, cin, cout):
        norm(f"{name}.in_layers.0", cin)
        conv(f"{name}.in_layers.2", cin, cout, 3)
        linear(f"{name}.emb_layers.1", temb, 2 * cout)
        norm(f"{name}.out_layers.0", cout)
        conv(f"{name}.out_layers.3", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.skip_connection", cin, cout, 1)

    def swin(name, c, res):
        conv(f"{name}.patch_embed.proj", c, embed, 1)
        conv(f"{name}.patch_unembed.proj", embed, c, 1)
        ws = min(window, res)
        for i in range(p["swin_depth"]):
            b = f"{name}.blocks.{i}"
            norm(f"{b}.norm1", embed)
            shapes[f"{b}.attn.relative_position_bias_table"] = ((2 * ws - 1) ** 2, heads)
            shapes[f"{b}.attn.relative_position_index"] = (ws * ws, ws * ws)
            linear(f"{b}.attn.qkv", embed, 3 * embed)
            linear(f"{b}.attn.proj", embed, embed)
            norm(f"{b}.norm2", embed)
            conv(f"{b}.mlp.fc1", embed, int(embed * p["mlp_ratio"]), 1)
            conv(f"{b}.mlp.fc2", int(embed * p["mlp_ratio"]), embed, 1)
            if i % 2 == 1 and res > window:
                shapes[f"{b}.attn_mask"] = ((res // ws) ** 2, ws * ws, ws * ws)

    linear("time_embed.0", mc, temb)
    linear("time_embed.2", temb, temb)
    ch = mc * p["channel_mult"][0]
    conv("input_blocks.0.0", p["in_channels"] + 3, ch, 3)
    chans, res, index = [ch], p["image_size"], 1
    for level, mult in enumerate(p["channel_mult"]):
        for j in range(p["num_res_blocks"][level]):
            resblock(f"input_blocks.{index}.0", ch, mc * mult)
            ch = mc * mult
            if res in p["attention_resolutions"] and j == 0:
                swin(f"input_blocks.{index}.1", ch, res)
            chans.append(ch)
            index += 1
        if level != len(p["channel_mult"]) - 1:
            conv(f"input_blocks.{index}.0.op", ch, ch, 3)
            chans.append(ch)
            index += 1
            res //= 2
    resblock("middle_block.0", ch, ch)
    swin("middle_block.1", ch, res)
    resblock("middle_block.2", ch, ch)
    index = 0
    for level, mult in reversed(list(enumerate(p["channel_mult"]))):
        for i in range(p["num_res_blocks"][level] + 1):
            resblock(f"output_blocks.{index}.0", ch + chans.pop(), mc * mult)
            ch = mc * mult
            layer = 1
            if res in p["attention_resolutions"] and i == 0:
                swin(f"output_blocks.{index}.1", ch, res)
                layer = 2
            if level and i == p["num_res_blocks"][level]:
                conv(f"output_blocks.{index}.{layer}.conv", ch, ch, 3)
                res *= 2
            index += 1
    norm("out.0", ch)
    conv("out.2", mc * p["channel_mult"][0], out_channels, 3)
    return shapes


def official_vq_shapes(a: dict) -> dict[str, tuple]:
    """Name -> shape of an official ``VQModelTorch`` state dict (LDM ``Encoder`` / ``Decoder``, no attention in the
    levels, one in the middle)."""
    dd, shapes = a["ddconfig"], {}

    def conv(name, cin, cout, k):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c,), (c,)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def middle(prefix, c):
        resnet(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{part}", c, c, 1)
        resnet(f"{prefix}.mid.block_2", c, c)

    ch, mult, levels, blocks, z = dd["ch"], dd["ch_mult"], len(dd["ch_mult"]), dd["num_res_blocks"], dd["z_channels"]
    conv("encoder.conv_in", dd["in_channels"], ch, 3)
    block_in = ch
    for i in range(levels):
        for j in range(blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in, ch * mult[i])
            block_in = ch * mult[i]
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    middle("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", block_in, z, 3)
    block_in = ch * mult[-1]
    conv("decoder.conv_in", z, block_in, 3)
    middle("decoder", block_in)
    for i in reversed(range(levels)):
        for j in range(blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, ch * mult[i])
            block_in = ch * mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, dd["out_ch"], 3)
    conv("quant_conv", z, a["embed_dim"], 1)
    conv("post_quant_conv", a["embed_dim"], z, 1)
    shapes["quantize.embedding.weight"] = (a["n_embed"], a["embed_dim"])
    return shapes


def random_state(shapes: dict[str, tuple], seed: int, buffers: dict[str, torch.Tensor] | None = None) -> dict:
    """Random float32 tensors of ``shapes`` (weights around 0.1, norms around 1), ``buffers`` as given."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if buffers and name in buffers:
            state[name] = buffers[name]
            continue
        value = torch.randn(shape, generator=gen) * (0.3 / max(1, (torch.tensor(shape[1:]).prod().item()) ** 0.5))
        if name.endswith(".weight") and len(shape) == 1:
            value = 1 + value
        state[name] = value
    return state


def official_unet_buffers(shapes: dict[str, tuple], window: int) -> dict[str, torch.Tensor]:
    """The Swin buffers (official ``relative_position_index`` and ``attn_mask`` computations), written here from the
    official loops with plain Python, not from the code under test."""
    buffers = {}
    for name, shape in shapes.items():
        if name.endswith("relative_position_index"):
            ws = int(round(shape[0] ** 0.5))
            index = torch.empty(shape, dtype=torch.long)
            for i in range(ws * ws):
                for j in range(ws * ws):
                    dy, dx = i // ws - j // ws, i % ws - j % ws
                    index[i, j] = (dy + ws - 1) * (2 * ws - 1) + (dx + ws - 1)
            buffers[name] = index
        elif name.endswith("attn_mask"):
            windows, tokens, _ = shape
            ws, per_side = int(round(tokens**0.5)), int(round(windows**0.5))
            buffers[name] = official_shift_mask(per_side * ws, ws, ws // 2)
    return buffers


def official_shift_mask(side: int, ws: int, shift: int) -> torch.Tensor:
    """The official ``calculate_mask`` for a square map, by explicit loops over its quirks: labels by row band only
    (its slices index a singleton channel and the rows), and the in-window token order column-major."""
    def label(row: int) -> int:
        return 0 if row < side - ws else (1 if row < side - shift else 2)

    per_side = side // ws
    mask = torch.zeros(per_side * per_side, ws * ws, ws * ws)
    for wy in range(per_side):
        for wx in range(per_side):
            n = wy * per_side + wx
            # flattened token k of the mask's order is (column a = k // ws, row b = k % ws) of the window
            labels = [label(wy * ws + k % ws) for k in range(ws * ws)]
            for i in range(ws * ws):
                for j in range(ws * ws):
                    mask[n, i, j] = -100.0 if labels[j] != labels[i] else 0.0
    return mask


def write_official_files(folder: Path, *, seed: int = 0, wrap: str = "state_dict", prefix: str = "module.") -> dict:
    """A tiny ResShift UNet ``.pth`` (``wrap``: ``state_dict`` for ``{'state_dict': ...}``, ``raw`` for the bare
    dict; every key prefixed by ``prefix``), its VQ ``autoencoder_vq_f4.pth`` and the YAML config, in ``folder``.
    Returns the paths and the unprefixed state dicts."""
    folder.mkdir(parents=True, exist_ok=True)
    model = dict(TINY_MODEL, out_channels=TINY_AUTOENCODER["embed_dim"])
    shapes = official_unet_shapes(model)
    unet_state = random_state(shapes, seed, official_unet_buffers(shapes, model["window_size"]))
    vq_state = random_state(official_vq_shapes(TINY_AUTOENCODER), seed + 1)
    prefixed = {prefix + k: v for k, v in unet_state.items()}
    torch.save({"state_dict": prefixed} if wrap == "state_dict" else prefixed, folder / "unet.pth")
    torch.save(vq_state, folder / "autoencoder_vq_f4.pth")
    return {
        "unet": folder / "unet.pth",
        "vq": folder / "autoencoder_vq_f4.pth",
        "config": write_tiny_config(folder / "tiny.yaml"),
        "unet_state": unet_state,
        "vq_state": vq_state,
    }
