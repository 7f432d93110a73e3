"""Seeded, time-bounded fuzzing: a few hundred randomly mutated model files (metadata fields, nested JSON, bytes,
tensors, OSEDiff pickles) and images (bytes, headers, modes, sizes). Each must end in an output or in one sentence
(naming the file, for model files), with no other exception (a traceback in a host), nothing written beside it,
and no allocation over the limits. Reproduce a failure with its case number: the mutations are drawn from
``random.Random(SEED + case)``."""

from __future__ import annotations

import io
import json
import random
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from d3sr_core.checkpoints import save_checkpoint
from d3sr_core.image_io import read_image
from d3sr_core.loading import load_model
from d3sr_core.pipeline import Upscaler
from test_hostile_models import ERRORS, RSS_LIMIT_BYTES, SWEEP_PIXELS, attempt, micro_checkpoint, peak_rss

SEED = 20261201
CASES = 300
BUDGET_S = 45.0
"""Stop drawing new cases after this long (the CPU may be shared); at least MIN_CASES must have run."""
MIN_CASES = 120

JUNK = [
    "", "0", "-1", "1e308", "nan", "inf", "-0", "99999999999999999999", "1.5", "true", "null", "[]", "{}", "[[[[]]]]",
    '{"a": {"b": [1, 2, {"c": null}]}}', "\u202e\u0000x", "../../../etc/passwd", "a" * 5000, '"quoted"', "[1e400]",
]


def junk_value(rng: random.Random):
    return rng.choice([
        rng.randint(-(2**63), 2**63), rng.randint(-3, 70000), 10 ** rng.randint(5, 40), rng.random() * 10 ** rng.randint(-5, 30),
        float("nan") if rng.random() < 0.5 else float("inf"), None, True, "", "x" * rng.randint(1, 300), [], {}, [junk_value(rng) for _ in range(2)] if rng.random() < 0.3 else [1],
        {"k": 1},
    ])


def mutate_json(rng: random.Random, value):
    """``value`` with one randomly chosen node (at any depth) replaced by junk."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(list(value))
        return {**value, key: mutate_json(rng, value[key])}
    if isinstance(value, list) and value and rng.random() < 0.8:
        i = rng.randrange(len(value))
        return value[:i] + [mutate_json(rng, value[i])] + value[i + 1:]
    return junk_value(rng)


def dumps(value) -> str:
    try:
        return json.dumps(value)
    except (ValueError, OverflowError):
        return "[]"


def mutated_model(rng: random.Random, good: Path, meta: dict, state: dict, target: Path) -> str:
    """Write one mutated copy of ``good`` to ``target``; returns what was done (for messages)."""
    kind = rng.choice(["field", "field", "json", "json", "json", "bytes", "header", "truncate", "append", "tensor", "tensor"])
    data = good.read_bytes()
    if kind == "field":
        field = rng.choice(list(meta))
        value = rng.choice(JUNK + [str(junk_value(rng)), None])
        new = {k: v for k, v in meta.items() if k != field}
        if value is not None:
            new[field] = value
        save_file(state, str(target), metadata=new)
        return f"{field}={str(value)[:40]!r}"
    if kind == "json":
        field = rng.choice([k for k in ("adapters", "defaults", "base_configs", "training_config") if k in meta])
        new = {**meta, field: dumps(mutate_json(rng, json.loads(meta[field])))}
        save_file(state, str(target), metadata=new)
        return f"{field} nested: {new[field][:60]}"
    if kind == "bytes":
        mutable = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            mutable[rng.randrange(len(mutable))] = rng.randrange(256)
        target.write_bytes(bytes(mutable))
        return "bytes flipped"
    if kind == "header":
        header_len = struct.unpack("<Q", data[:8])[0]
        mutable = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutable[rng.randrange(8 + header_len)] = rng.randrange(256)
        target.write_bytes(bytes(mutable))
        return "header bytes flipped"
    if kind == "truncate":
        target.write_bytes(data[: rng.randrange(len(data))])
        return "truncated"
    if kind == "append":
        target.write_bytes(data + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
        return "bytes appended"
    key = rng.choice(list(state))
    value = state[key]
    choice = rng.choice(["dtype", "shape", "nan", "empty", "scalar", "drop"])
    new_state = dict(state)
    if choice == "dtype":
        new_state[key] = value.to(rng.choice([torch.int32, torch.int8, torch.float16, torch.bfloat16, torch.float64, torch.bool]))
    elif choice == "shape":
        new_state[key] = torch.zeros(*[max(1, s + rng.randint(-1, 2)) for s in value.shape]) if value.ndim else torch.zeros(3)
    elif choice == "nan":
        new_state[key] = torch.full_like(value, float("nan")) if value.is_floating_point() else value
    elif choice == "empty":
        new_state[key] = torch.zeros(0)
    elif choice == "scalar":
        new_state[key] = torch.tensor(1.0)
    else:
        del new_state[key]
    save_file(new_state, str(target), metadata=meta)
    return f"tensor {key} {choice}"


def small_image_bytes(rng: random.Random) -> tuple[bytes, str]:
    """A small image in a random format and mode."""
    height, width = rng.randint(1, 12), rng.randint(1, 12)
    mode = rng.choice(["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "F", "I", "CMYK"])
    fmt = rng.choice(["PNG", "JPEG", "BMP", "TIFF", "WEBP"])
    if mode in ("LA", "RGBA", "P", "I;16", "I", "F") and fmt == "JPEG":
        fmt = "PNG"
    if mode in ("F", "I", "CMYK") or (mode == "I;16" and fmt in ("BMP", "WEBP")):
        fmt = "TIFF"
    array = np.random.default_rng(rng.randrange(2**32)).integers(0, 255, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(array).convert(mode if mode != "I;16" else "I").convert(mode) if mode != "I;16" else Image.fromarray(array[..., 0].astype(np.uint16) * 257)
    buffer = io.BytesIO()
    try:
        image.save(buffer, format=fmt)
    except (OSError, KeyError, ValueError):  # a mode the format cannot hold: PNG holds them all
        buffer, fmt = io.BytesIO(), "PNG"
        image.convert("RGBA" if "A" in mode else "RGB").save(buffer, format=fmt)
    return buffer.getvalue(), fmt.lower()


def forged_ihdr(rng: random.Random) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", rng.choice([0, 1, 50000, 2**31 - 1, rng.randint(1, 100000)]),
                              rng.choice([0, 1, 50000, 2**31 - 1, rng.randint(1, 100000)]))
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def mutated_image(rng: random.Random, target_stem: Path) -> tuple[Path, str]:
    kind = rng.choice(["clean", "bytes", "truncate", "ihdr", "junk"])
    if kind == "ihdr":
        data, suffix = forged_ihdr(rng), "png"
    elif kind == "junk":
        data, suffix = bytes(rng.randrange(256) for _ in range(rng.randint(0, 200))), rng.choice(["png", "jpg", "webp"])
    else:
        data, suffix = small_image_bytes(rng)
        if kind == "bytes" and len(data) > 8:
            mutable = bytearray(data)
            for _ in range(rng.randint(1, 6)):
                mutable[rng.randrange(8, len(mutable))] = rng.randrange(256)
            data = bytes(mutable)
        elif kind == "truncate":
            data = data[: rng.randrange(max(1, len(data)))]
    path = target_stem.with_suffix("." + suffix)
    path.write_bytes(data)
    return path, kind


def test_fuzzed_model_files_and_images_end_in_an_output_or_one_sentence(tmp_path, tiny_base_dir, record_property):
    from tiny_models import write_osediff_pkl

    good = save_checkpoint(micro_checkpoint(), tmp_path / "good.safetensors")
    with safe_open(str(good), framework="pt") as f:
        meta, state = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    pkl = write_osediff_pkl(tmp_path / "good.pkl")
    micro = load_model(good)
    upscaler = Upscaler(micro.generator, winograd=False)
    options = micro.defaults.updated(max_output_pixels=SWEEP_PIXELS)
    work = tmp_path / "work"
    work.mkdir()
    start_rss, started = peak_rss(), time.monotonic()
    counts = {"model": [0, 0], "pickle": [0, 0], "image": [0, 0]}
    outputs = 0
    for case in range(CASES):
        if time.monotonic() - started > BUDGET_S:
            break
        rng = random.Random(SEED + case)
        what = "drawing the case"
        area = rng.choices(["model", "pickle", "image"], weights=[5, 2, 3])[0]
        try:
            if area == "model":
                path = work / f"case{case}.safetensors"
                what = mutated_model(rng, good, meta, state, path)
                outcome = attempt(path, max_output_pixels=SWEEP_PIXELS)
                names = path.name
            elif area == "pickle":
                path = work / f"case{case}.pkl"
                field = rng.choice(list(pkl))
                what = f"pickle {field}"
                torch.save({**pkl, field: mutate_json(rng, pkl[field]) if not isinstance(pkl[field], dict) or rng.random() < 0.5
                            else {**pkl[field], rng.choice(list(pkl[field])): junk_value(rng)}}, path)
                outcome = attempt(path, base=tiny_base_dir, max_output_pixels=SWEEP_PIXELS)
                names = path.name
            else:
                path, what = mutated_image(rng, work / f"case{case}")
                try:
                    pixels = read_image(path).pixels
                    upscaler.upscale(pixels[None], options)
                    outcome = "output"
                except ERRORS as err:
                    outcome = str(err)
                names = None if "raise max_output_pixels" in outcome else path.name
        except Exception as err:  # anything else is what a host would show as a traceback
            raise AssertionError(f"case {case} ({area}: {what}) raised {type(err).__name__}: {err}") from err
        counts[area][0] += 1
        if outcome == "output":
            outputs += 1
        else:
            one_sentence = "\n" not in outcome and outcome.rstrip().endswith((".", ".)")) and "Traceback" not in outcome
            # A request over the limits, or a file whose finite weights still overflow when run, is refused at
            # run time: the sentence then says what to change rather than which file.
            named = names is None or names in outcome or "raise max_output_pixels" in outcome or "produced NaN" in outcome
            assert one_sentence and named, f"case {case} ({area}: {what}): {outcome!r}"
        counts[area][1] += 1
        assert sorted(p.name for p in work.iterdir()) == [path.name], f"case {case} ({area}: {what}) wrote files"
        path.unlink()
    tried = sum(c[0] for c in counts.values())
    held = sum(c[1] for c in counts.values())
    assert peak_rss() - start_rss < RSS_LIMIT_BYTES
    summary = ", ".join(f"{k} {v[1]}/{v[0]}" for k, v in counts.items())
    record_property("fuzz", f"{held}/{tried}")
    print(f"fuzz: {tried} cases tried, {held} held ({summary}); {outputs} ended in an output")
    assert tried >= MIN_CASES, f"only {tried} cases ran in {BUDGET_S} s"
    assert outputs > 0 and held == tried
