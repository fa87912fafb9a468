"""A1111's image grids (``modules/images.py``): ``image_grid`` and ``draw_grid_annotations``, the legends of
X/Y/Z plots and prompt matrices.

The layout is A1111's: cells on a white canvas, a band on top for the column labels and one on the left
(3/4 of a cell wide) for the row labels, font size (cell width + height) / 25, inactive labels grey and struck
through. The font is Pillow's bundled one, so the lettering differs from A1111's DejaVuSans.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND, ACTIVE, INACTIVE = (255, 255, 255), (0, 0, 0), (153, 153, 153)


@dataclass(frozen=True)
class Label:
    text: str = ""
    active: bool = True


def image_grid(images: list[Image.Image], rows: int) -> Image.Image:
    """``images`` row by row on a ``rows``-row grid of cells as large as the largest image, each centred."""
    rows = min(rows, len(images))
    cols = math.ceil(len(images) / rows)
    w, h = (max(sizes) for sizes in zip(*(image.size for image in images)))
    grid = Image.new("RGB", (cols * w, rows * h), BACKGROUND)
    for i, image in enumerate(images):
        grid.paste(image, (i % cols * w + (w - image.width) // 2, i // cols * h + (h - image.height) // 2))
    return grid


def annotate(grid: Image.Image, width: int, height: int, columns: list[list[Label]], rows: list[list[Label]],
             margin: int = 0) -> Image.Image:
    """The grid of ``width`` x ``height`` cells with ``margin`` px between them and labels above each column
    and left of each row (A1111's ``draw_grid_annotations``)."""
    size = (width + height) // 25
    spacing, font = size // 2, ImageFont.load_default(size)
    pad_left = width * 3 // 4 if any(label.text for labels in rows for label in labels) else 0
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    columns = [_wrap(measure, labels, font, width) for labels in columns]
    rows = [_wrap(measure, labels, font, pad_left) for labels in rows]
    col_heights = [sum(_size(measure, label, font)[1] + spacing for label in labels) - spacing for labels in columns]
    row_heights = [sum(_size(measure, label, font)[1] for label in labels) for labels in rows]
    pad_top = max(col_heights) + spacing * 2 if sum(col_heights) > 0 else 0
    n_cols, n_rows = grid.width // width, grid.height // height
    out = Image.new("RGB", (grid.width + pad_left + margin * (n_cols - 1),
                            grid.height + pad_top + margin * (n_rows - 1)), BACKGROUND)
    for r in range(n_rows):
        for c in range(n_cols):
            cell = grid.crop((width * c, height * r, width * (c + 1), height * (r + 1)))
            out.paste(cell, (pad_left + (width + margin) * c, pad_top + (height + margin) * r))
    draw = ImageDraw.Draw(out)
    for c, labels in enumerate(columns):
        _draw(draw, pad_left + (width + margin) * c + width / 2, pad_top / 2 - col_heights[c] / 2, labels, font,
              spacing)
    for r, labels in enumerate(rows):
        _draw(draw, pad_left / 2, pad_top + (height + margin) * r + height / 2 - row_heights[r] / 2, labels, font,
              spacing)
    return out


def _size(draw: ImageDraw.ImageDraw, label: Label, font) -> tuple[int, int]:
    left, top, right, bottom = draw.multiline_textbbox((0, 0), label.text, font=font)
    return right - left, bottom - top


def _wrap(draw: ImageDraw.ImageDraw, labels: list[Label], font, width: int) -> list[Label]:
    """Each label broken into lines no wider than ``width`` (at word boundaries)."""
    out = []
    for label in labels:
        line = ""
        for word in label.text.split():
            if line and draw.textlength(f"{line} {word}", font=font) > width:
                out.append(Label(line, label.active))
                line = word
            else:
                line = f"{line} {word}".strip()
        out.append(Label(line, label.active))
    return out


def _draw(draw: ImageDraw.ImageDraw, x: float, y: float, labels: list[Label], font, spacing: int) -> None:
    for label in labels:
        w, h = _size(draw, label, font)
        colour = ACTIVE if label.active else INACTIVE
        draw.multiline_text((x, y + h / 2), label.text, font=font, fill=colour, anchor="mm", align="center")
        if not label.active:
            draw.line((x - w // 2, y + h // 2, x + w // 2, y + h // 2), fill=colour, width=4)
        y += h + spacing


def prompt_matrix(grid: Image.Image, width: int, height: int, parts: list[str], margin: int = 0) -> Image.Image:
    """A1111's ``draw_prompt_matrix``: the first half of the optional parts label the columns, the rest the
    rows; a part is active (black) in the cells that use it, struck through elsewhere."""
    optional = parts[1:]
    boundary = math.ceil(len(optional) / 2)
    horizontal, vertical = optional[:boundary], optional[boundary:]
    columns = [[Label(t, bool(pos & (1 << i))) for i, t in enumerate(horizontal)]
               for pos in range(1 << len(horizontal))]
    rows = [[Label(t, bool(pos & (1 << i))) for i, t in enumerate(vertical)] for pos in range(1 << len(vertical))]
    return annotate(grid, width, height, columns, rows, margin)
