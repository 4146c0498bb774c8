"""Labelled image grids (prompts × checkpoints × strengths), the contact sheets LoRA trainers make by hand.

A grid is a vertical stack of blocks. Each block has a wrapped title (usually the prompt), a header row
of column labels, a column of row labels on the left, and its cells. Geometry is computed once by
`layout` and drawn by `render_grid`, so tests (and callers) can ask where every cell and label went.

Text is drawn at fixed pixel sizes, never scaled with the cells: a 64 px cell still gets readable labels.
Columns widen to fit their longest word and rows grow to fit their label, so labels never overlap.
"""
from __future__ import annotations

import functools
import os
import unicodedata
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from lorabake import store

# Font sizes in pixels, independent of cell size.
TITLE_SIZE = 24
BLOCK_TITLE_SIZE = 18
LABEL_SIZE = 15
CAPTION_SIZE = 13
FOOTER_SIZE = 14

MARGIN = 16  # around the whole sheet
CELL_GAP = 4  # between neighbouring cells
LABEL_GAP = 8  # between labels and the cells they name
BLOCK_GAP = 28  # between blocks
LINE_SPACING = 4  # extra pixels between wrapped lines
ROW_LABEL_MAX_WIDTH = 260  # row labels wrap beyond this rather than squeezing the cells
MIN_CONTENT_WIDTH = 420  # titles of tiny-cell grids still get a line long enough to read

BACKGROUND = (255, 255, 255)
TEXT_COLOR = (26, 26, 26)
FOOTER_COLOR = (90, 90, 90)
RULE_COLOR = (225, 225, 225)

Box = tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive as in PIL


@dataclass
class GridBlock:
    title: str  # e.g. the prompt text; wrapped to the sheet width
    row_labels: list[str]  # e.g. ["epoch 1", "epoch 2", "final"]
    col_labels: list[str]  # e.g. ["strength 0.0", "strength 0.5", "strength 1.0"]
    images: list[list[Image.Image]]  # images[row][col]; one size within a block, blocks may differ
    captions: list[list[str]] | None = None  # captions[row][col]: a short line under each cell (a score)


@dataclass
class TextItem:
    kind: str  # "title", "block_title", "col_label", "row_label", "caption" or "footer"
    lines: list[str]
    font_size: int
    box: Box  # the region the lines occupy
    align: str  # "left", "center" or "right" within box
    color: tuple[int, int, int] = TEXT_COLOR


@dataclass
class GridLayout:
    size: tuple[int, int]
    cells: list[list[list[Box]]]  # cells[block][row][col], each exactly the cell image's size
    texts: list[TextItem] = field(default_factory=list)
    rules: list[Box] = field(default_factory=list)  # thin separators between blocks


# ---------------------------------------------------------------------------------------------- text

@functools.lru_cache(maxsize=None)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at `size` px; older Pillow (< 10.1) only has the fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


# The bundled font is machine-independent (same bytes everywhere) but covers little beyond ASCII, so
# characters it lacks get an ASCII stand-in instead of a blank box: "×" -> "x", "é" -> "e".
ASCII_STAND_INS = {"×": "x", "→": "->", "←": "<-", "–": "-", "—": "-", "≈": "~", "≤": "<=", "≥": ">=",
                   "ß": "ss", "µ": "u", "α": "alpha", "β": "beta", "λ": "lambda", "σ": "sigma", "∞": "inf"}
_MISSING = "\U0010FFFD"  # a private-use code point: no font has it, so it renders as the "missing" glyph


@functools.lru_cache(maxsize=None)
def has_glyph(char: str) -> bool:
    face = font(LABEL_SIZE)
    if not isinstance(face, ImageFont.FreeTypeFont):
        return char.isascii()  # the old bitmap fallback font is ASCII only
    return char.isspace() or bytes(face.getmask(char)) != bytes(face.getmask(_MISSING))


def displayable(text: str) -> str:
    """`text` with every character the font cannot draw replaced by an ASCII look-alike (or "?")."""
    def stand_in(char: str) -> str:
        if char in ASCII_STAND_INS:
            return ASCII_STAND_INS[char]
        return unicodedata.normalize("NFKD", char).encode("ascii", "ignore").decode() or "?"
    return "".join(char if has_glyph(char) else stand_in(char) for char in text)


_SCRATCH = ImageDraw.Draw(Image.new("L", (1, 1)))  # textbbox needs a Draw; it never draws here


def text_width(text: str, size: int) -> int:
    left, _, right, _ = _SCRATCH.textbbox((0, 0), text, font=font(size))
    return int(right - min(left, 0) + 0.999)


def line_height(size: int) -> int:
    """Height of one line including accents and descenders, so stacked lines never touch."""
    _, _, _, bottom = _SCRATCH.textbbox((0, 0), "ÅÉgjpqy|", font=font(size))
    return int(bottom + 0.999)


def block_height(lines: list[str], size: int) -> int:
    if not lines:
        return 0
    return len(lines) * line_height(size) + (len(lines) - 1) * LINE_SPACING


def block_width(lines: list[str], size: int) -> int:
    return max((text_width(line, size) for line in lines), default=0)


def wrap(text: str, size: int, max_width: int) -> list[str]:
    """Greedy word wrap to `max_width` px; a single word wider than that is broken by characters."""
    text = displayable(text)
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if text_width(candidate, size) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = word
            while text_width(line, size) > max_width and len(line) > 1:
                cut = _longest_fitting_prefix(line, size, max_width)
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return [line for line in lines if line] if text.strip() else []


def _longest_fitting_prefix(word: str, size: int, max_width: int) -> int:
    cut = 1
    while cut < len(word) and text_width(word[: cut + 1], size) <= max_width:
        cut += 1
    return cut


def widest_word(texts: list[str], size: int) -> int:
    return max((text_width(word, size) for text in texts for word in displayable(text).split()), default=0)


# -------------------------------------------------------------------------------------------- layout

def _check(block: GridBlock) -> tuple[int, int]:
    """Validate one block; return its cell size."""
    rows, cols = len(block.row_labels), len(block.col_labels)
    if len(block.images) != rows or any(len(row) != cols for row in block.images):
        raise ValueError(f"block {block.title!r}: images must be {rows} rows × {cols} columns to match the labels")
    if block.captions is not None and [len(row) for row in block.captions] != [cols] * rows:
        raise ValueError(f"block {block.title!r}: captions must be {rows} rows × {cols} columns like the images")
    sizes = {image.size for row in block.images for image in row}
    if len(sizes) > 1:
        raise ValueError(f"block {block.title!r}: cells differ in size {sorted(sizes)}")
    return sizes.pop() if sizes else (0, 0)


def _column_pitch(block: GridBlock, cell_width: int) -> int:
    # A column is as wide as its cell or its longest label word, whichever is wider, so labels wrap
    # only at spaces and never spill into the neighbouring column.
    return max(cell_width, widest_word(block.col_labels, LABEL_SIZE))


def layout(blocks: list[GridBlock], title: str = "", footer: str = "") -> GridLayout:
    """Where every cell, label and title goes; `render_grid` only paints what this decides."""
    cell_sizes = [_check(block) for block in blocks]
    all_row_labels = [label for block in blocks for label in block.row_labels]
    # One row-label column for every block, so the grids' left edges line up down the sheet.
    label_col = min(block_width(all_row_labels, LABEL_SIZE), ROW_LABEL_MAX_WIDTH)
    grid_left = MARGIN + label_col + (LABEL_GAP if label_col else 0)
    pitches = [_column_pitch(block, w) for block, (w, _) in zip(blocks, cell_sizes)]
    grid_widths = [len(b.col_labels) * p + max(len(b.col_labels) - 1, 0) * CELL_GAP for b, p in zip(blocks, pitches)]
    content_width = max([MIN_CONTENT_WIDTH] + [grid_left - MARGIN + w for w in grid_widths])
    width = content_width + 2 * MARGIN

    texts: list[TextItem] = []
    cells: list[list[list[Box]]] = []
    rules: list[Box] = []
    y = MARGIN

    def place(kind: str, lines: list[str], size: int, left: int, right: int, top: int, align: str,
              color: tuple[int, int, int] = TEXT_COLOR) -> int:
        """Record a text item filling [left, right) from `top`; return the y just below it."""
        height = block_height(lines, size)
        if lines:
            texts.append(TextItem(kind, lines, size, (left, top, right, top + height), align, color))
        return top + height

    if title_lines := wrap(title, TITLE_SIZE, content_width):
        y = place("title", title_lines, TITLE_SIZE, MARGIN, MARGIN + content_width, y, "center") + BLOCK_GAP // 2

    for index, (block, (cell_w, cell_h), pitch) in enumerate(zip(blocks, cell_sizes, pitches)):
        if index:
            rules.append((MARGIN, y + BLOCK_GAP // 2 - 1, MARGIN + content_width, y + BLOCK_GAP // 2))
            y += BLOCK_GAP
        y = place("block_title", wrap(block.title, BLOCK_TITLE_SIZE, content_width), BLOCK_TITLE_SIZE,
                  MARGIN, MARGIN + content_width, y, "left")
        y += LABEL_GAP if block.title.strip() else 0

        col_lines = [wrap(label, LABEL_SIZE, pitch) for label in block.col_labels]
        header_h = max((block_height(lines, LABEL_SIZE) for lines in col_lines), default=0)
        for col, lines in enumerate(col_lines):
            left = grid_left + col * (pitch + CELL_GAP)
            # Bottom-align so one-line labels sit right above their cells next to two-line ones.
            place("col_label", lines, LABEL_SIZE, left, left + pitch, y + header_h - block_height(lines, LABEL_SIZE),
                  "center")
        y += header_h + (LABEL_GAP if header_h else 0)

        block_cells: list[list[Box]] = []
        for row, label in enumerate(block.row_labels):
            lines = wrap(label, LABEL_SIZE, label_col) if label_col else []
            captions = [wrap(text, CAPTION_SIZE, pitch) for text in block.captions[row]] if block.captions else []
            caption_h = max((block_height(c, CAPTION_SIZE) for c in captions), default=0)
            stack_h = cell_h + (2 + caption_h if caption_h else 0)  # the cell and the caption under it
            row_h = max(stack_h, block_height(lines, LABEL_SIZE))
            place("row_label", lines, LABEL_SIZE, MARGIN, MARGIN + label_col,
                  y + (row_h - block_height(lines, LABEL_SIZE)) // 2, "right")
            top = y + (row_h - stack_h) // 2
            columns = [grid_left + col * (pitch + CELL_GAP) for col in range(len(block.col_labels))]
            lefts = [column + (pitch - cell_w) // 2 for column in columns]
            block_cells.append([(left, top, left + cell_w, top + cell_h) for left in lefts])
            for column, caption in zip(columns, captions):
                place("caption", caption, CAPTION_SIZE, column, column + pitch, top + cell_h + 2, "center", FOOTER_COLOR)
            y += row_h + (CELL_GAP if row < len(block.row_labels) - 1 else 0)
        cells.append(block_cells)

    if footer_lines := wrap(footer, FOOTER_SIZE, content_width):
        y = place("footer", footer_lines, FOOTER_SIZE, MARGIN, MARGIN + content_width, y + BLOCK_GAP // 2 + 4,
                  "center", FOOTER_COLOR)
    return GridLayout(size=(width, y + MARGIN), cells=cells, texts=texts, rules=rules)


# ------------------------------------------------------------------------------------------- drawing

def _on_white(image: Image.Image) -> Image.Image:
    """RGB copy of `image`; transparent parts show the sheet's white, not black."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(backdrop, rgba).convert("RGB")
    return image.convert("RGB")


def _draw_text(draw: ImageDraw.ImageDraw, item: TextItem) -> None:
    left, top, right, _ = item.box
    step = line_height(item.font_size) + LINE_SPACING
    for i, line in enumerate(item.lines):
        slack = right - left - text_width(line, item.font_size)
        x = left + {"left": 0, "center": slack // 2, "right": slack}[item.align]
        draw.text((x, top + i * step), line, fill=item.color, font=font(item.font_size))


def render_grid(blocks: list[GridBlock], title: str = "", footer: str = "") -> Image.Image:
    """Paint the sheet described by `layout(blocks, title, footer)`."""
    plan = layout(blocks, title, footer)
    sheet = Image.new("RGB", plan.size, BACKGROUND)
    for block, block_boxes in zip(blocks, plan.cells):
        for row_images, row_boxes in zip(block.images, block_boxes):
            for image, box in zip(row_images, row_boxes):
                sheet.paste(_on_white(image), box[:2])
    draw = ImageDraw.Draw(sheet)
    for rule in plan.rules:
        draw.rectangle((rule[0], rule[1], rule[2] - 1, rule[3] - 1), fill=RULE_COLOR)
    for item in plan.texts:
        _draw_text(draw, item)
    return sheet


MIN_CELL_SIDE = 128  # smaller images (a 64 px toy base's) are shown enlarged, so a person can judge them


def readable(image: Image.Image, min_side: int = MIN_CELL_SIDE) -> Image.Image:
    """`image` enlarged by a whole factor (nearest neighbour: no invented detail) until its short
    side is at least `min_side`; images already that large are returned as they are."""
    factor = -(-min_side // max(1, min(image.size)))
    return image if factor <= 1 else image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    """Write `image` as PNG atomically, with no metadata: same pixels, same bytes."""
    clean = image.copy()
    clean.info = {}  # drop text chunks / ICC profiles inherited from a loaded source image
    with store.atomic_path(path) as tmp:
        clean.save(tmp, format="PNG")  # explicit: the temp file's suffix is .tmp
