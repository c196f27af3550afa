"""Draw the ProtoSAM icons with Pillow (run from anywhere; writes next to this file).

- ProtoSAM.png (128 x 128): module and extension icon. A stack of slices; the middle one holds
  a painted structure and its outline spreads to the slices above and below.
- SegmentEditorProtoSAM.png (64 x 64): the Segment Editor effect button, same motif, simpler.

The PNGs are committed; rerun this script only to change the design.
"""

import pathlib

from PIL import Image, ImageDraw

HERE = pathlib.Path(__file__).resolve().parent
SLICE_FILL = (222, 230, 240, 255)
SLICE_EDGE = (70, 90, 120, 255)
PAINT = (226, 87, 60, 255)
PROPAGATED = (226, 87, 60, 150)


def slice_polygon(cx, cy, width, depth):
    """A slice seen in perspective: parallelogram centred on (cx, cy)."""
    return [(cx - width / 2 + depth, cy - depth / 2), (cx + width / 2 + depth, cy - depth / 2),
            (cx + width / 2 - depth, cy + depth / 2), (cx - width / 2 - depth, cy + depth / 2)]


def blob(cx, cy, rx, ry):
    return [cx - rx, cy - ry, cx + rx, cy + ry]


def draw_icon(size, slices, line):
    scale = 4  # draw large, downsample for smooth edges
    canvas = size * scale
    image = Image.new("RGBA", (canvas, canvas), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    width, depth = canvas * 0.62, canvas * 0.2
    spacing = canvas * 0.72 / max(len(slices) - 1, 1)
    top = canvas * 0.18
    for index, kind in enumerate(slices):
        cy = top + index * spacing
        cx = canvas * 0.5
        draw.polygon(slice_polygon(cx, cy, width, depth), fill=SLICE_FILL, outline=SLICE_EDGE, width=line * scale)
        radius = {"painted": 0.22, "near": 0.17, "far": 0.1}.get(kind)
        if radius is not None:
            box = blob(cx, cy, width * radius, depth * radius * 1.6)
            if kind == "painted":
                draw.ellipse(box, fill=PAINT, outline=(150, 40, 25, 255), width=line * scale)
            else:
                draw.ellipse(box, outline=PROPAGATED, width=2 * line * scale)
    return image.resize((size, size), Image.LANCZOS)


def main():
    draw_icon(128, ["far", "near", "painted", "near", "far"], line=1).save(HERE / "ProtoSAM.png")
    draw_icon(64, ["near", "painted", "near"], line=1).save(HERE / "SegmentEditorProtoSAM.png")


if __name__ == "__main__":
    main()
