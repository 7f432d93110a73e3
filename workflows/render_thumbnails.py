"""Draw each UI-format workflow here as a small PNG thumbnail (nodes, titles, links): python render_thumbnails.py"""

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

TITLES = {
    "LoadImage": "Load Image",
    "D3SRModelLoader": "Load One-Step SR Model (D3SR)",
    "D3SRUpscale": "Upscale Image (One-Step Diffusion SR)",
    "SaveImage": "Save Image",
}
SCALE = 0.5


def render(path: Path) -> Path:
    graph = json.loads(path.read_text())
    nodes = {n["id"]: n for n in graph["nodes"]}
    right = max(n["pos"][0] + n["size"][0] for n in nodes.values()) + 40
    bottom = max(n["pos"][1] + n["size"][1] for n in nodes.values()) + 40
    image = Image.new("RGB", (int(right * SCALE), int(bottom * SCALE)), (32, 32, 36))
    draw = ImageDraw.Draw(image)
    title_font, text_font = ImageFont.load_default(size=13), ImageFont.load_default(size=11)

    def box(node):
        x, y = node["pos"]
        w, h = node["size"]
        return [v * SCALE for v in (x, y, x + w, y + h)]

    for _, source, _, target, _, kind in graph["links"]:
        a, b = box(nodes[source]), box(nodes[target])
        draw.line([(a[2], a[1] + 18), (b[0], b[1] + 18)], fill=(120, 200, 120) if kind == "IMAGE" else (200, 160, 90), width=3)
    for node in nodes.values():
        x0, y0, x1, y1 = box(node)
        draw.rounded_rectangle([x0, y0, x1, y1], radius=8, fill=(53, 53, 60), outline=(90, 90, 100))
        draw.rounded_rectangle([x0, y0, x1, y0 + 24], radius=8, fill=(70, 70, 82))
        draw.text((x0 + 8, y0 + 5), TITLES.get(node["type"], node["type"]), font=title_font, fill=(235, 235, 235))
        for row, value in enumerate(node.get("widgets_values", [])[:6]):
            draw.text((x0 + 10, y0 + 32 + 16 * row), str(value)[:40], font=text_font, fill=(180, 180, 190))
    out = path.with_suffix(".png")
    image.save(out)
    return out


if __name__ == "__main__":
    for workflow in sorted(Path(__file__).parent.glob("*.json")):
        print(render(workflow))
