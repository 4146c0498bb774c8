"""Grid layout: cells land exactly where `layout` says, labels are drawn, bytes are stable."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lorabake.render import grid
from lorabake.render.grid import GridBlock, layout, render_grid, save_png

WHITE = (255, 255, 255)


def noise(size: tuple[int, int], seed: int) -> Image.Image:
    # Noise rather than solid colour: any off-by-one in placement changes the cropped bytes.
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def make_blocks() -> list[GridBlock]:
    small = GridBlock(
        title="a photo of sks dog on a red couch, highly detailed, 35mm, bokeh, warm tones, trending",
        row_labels=["epoch 1", "final"],
        col_labels=["strength 0.0", "strength 0.5", "strength 1.0"],
        images=[[noise((64, 64), 10 * r + c) for c in range(3)] for r in range(2)],
    )
    large = GridBlock(
        title="sks dog as an oil painting",
        row_labels=["epoch 1", "a much longer row label"],
        col_labels=["0.0", "0.5", "1.0", "1.5"],
        images=[[noise((200, 150), 100 + 10 * r + c) for c in range(4)] for r in range(2)],
    )
    return [small, large]


def overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def all_cell_boxes(plan: grid.GridLayout) -> list[tuple[int, int, int, int]]:
    return [box for block in plan.cells for row in block for box in row]


def test_dimensions_follow_the_largest_block():
    blocks = make_blocks()
    plan = layout(blocks, title="sheet", footer="seed 42 · 8 steps")
    image = render_grid(blocks, title="sheet", footer="seed 42 · 8 steps")
    assert image.size == plan.size and image.mode == "RGB"
    boxes = all_cell_boxes(plan)
    # The wide block sets the width; the footer is the last thing before the bottom margin.
    assert plan.size[0] == max(b[2] for b in boxes) + grid.MARGIN
    footer = next(t for t in plan.texts if t.kind == "footer")
    assert plan.size[1] == footer.box[3] + grid.MARGIN
    for block, block_boxes in zip(blocks, plan.cells):
        assert len(block_boxes) == len(block.row_labels)
        for images, row_boxes in zip(block.images, block_boxes):
            assert [(b[2] - b[0], b[3] - b[1]) for b in row_boxes] == [im.size for im in images]
            assert len({b[1] for b in row_boxes}) == 1  # one row, one top edge
            assert all(a[2] + grid.CELL_GAP <= b[0] for a, b in zip(row_boxes, row_boxes[1:]))
    # Blocks are stacked, the second entirely below the first.
    assert max(b[3] for row in plan.cells[0] for b in row) < min(b[1] for row in plan.cells[1] for b in row)


def test_cells_are_pasted_exactly_at_their_boxes():
    blocks = make_blocks()
    image = render_grid(blocks, title="t")
    plan = layout(blocks, title="t")
    for block, block_boxes in zip(blocks, plan.cells):
        for images, row_boxes in zip(block.images, block_boxes):
            for expected, box in zip(images, row_boxes):
                assert image.crop(box).tobytes() == expected.tobytes()


def test_labels_are_drawn_in_their_areas_and_clear_of_cells():
    blocks = make_blocks()
    image = render_grid(blocks, title="LoRA sheet", footer="seed 42")
    plan = layout(blocks, title="LoRA sheet", footer="seed 42")
    kinds = [t.kind for t in plan.texts]
    assert kinds.count("row_label") == 4 and kinds.count("col_label") == 7
    assert kinds.count("block_title") == 2 and kinds.count("title") == 1 and kinds.count("footer") == 1
    cells = all_cell_boxes(plan)
    for item in plan.texts:
        colours = image.crop(item.box).getcolors(maxcolors=1 << 16)
        assert any(colour != WHITE for _, colour in colours), item
        assert not any(overlaps(item.box, cell) for cell in cells), item
    for a in plan.texts:  # no two labels share pixels
        for b in plan.texts:
            assert a is b or not overlaps(a.box, b.box), (a, b)


def test_tiny_cells_keep_text_full_size():
    block = GridBlock("p", ["epoch 10"], ["strength 0.25", "strength 0.75"], [[noise((16, 16), 1)] * 2])
    plan = layout([block])
    labels = [t for t in plan.texts if t.kind == "col_label"]
    assert all(t.font_size == grid.LABEL_SIZE for t in labels)
    assert not overlaps(labels[0].box, labels[1].box)
    # Columns widen for their labels, so the two cells sit further apart than the bare gap.
    (left, right), = plan.cells[0]
    assert right[0] - left[2] > grid.CELL_GAP


def test_transparent_cells_show_white_and_bad_shapes_are_rejected():
    clear = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    image = render_grid([GridBlock("", ["r"], ["c"], [[clear]])])
    box = layout([GridBlock("", ["r"], ["c"], [[clear]])]).cells[0][0][0]
    assert image.crop(box).getcolors() == [(32 * 32, WHITE)]
    with pytest.raises(ValueError):
        render_grid([GridBlock("", ["r1", "r2"], ["c"], [[clear]])])
    with pytest.raises(ValueError):
        render_grid([GridBlock("", ["r"], ["c1", "c2"], [[clear, Image.new("RGB", (8, 8))]])])


def test_wrap_fits_width_and_missing_glyphs_get_stand_ins():
    lines = grid.wrap("a long prompt " * 20 + "supercalifragilisticexpialidocious", grid.LABEL_SIZE, 120)
    assert len(lines) > 1 and all(grid.text_width(line, grid.LABEL_SIZE) <= 120 for line in lines)
    assert grid.displayable("seeds × strengths — café") == "seeds x strengths - cafe"


def test_save_png_is_byte_stable(tmp_path):
    image = render_grid(make_blocks(), title="t", footer="f")
    save_png(image, tmp_path / "a.png")
    image.info["comment"] = "varies"  # metadata carried on the image must not reach the file
    save_png(image, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]  # no temp files left
    with Image.open(tmp_path / "a.png") as reloaded:
        assert reloaded.tobytes() == image.tobytes()


def test_captions_sit_under_their_cells_and_clear_of_everything():
    blocks = make_blocks()
    blocks[0].captions = [[f"star 0.{r}{c}" for c in range(3)] for r in range(2)]
    image = render_grid(blocks, footer="f")
    plan = layout(blocks, footer="f")
    captions = [t for t in plan.texts if t.kind == "caption"]
    assert [t.lines[0] for t in captions] == [f"star 0.{r}{c}" for r in range(2) for c in range(3)]
    for item, cell in zip(captions, [box for row in plan.cells[0] for box in row]):
        assert cell[3] <= item.box[1] <= cell[3] + 4 and item.box[0] <= cell[0] and cell[2] <= item.box[2]
        assert any(colour != WHITE for _, colour in image.crop(item.box).getcolors(maxcolors=1 << 16))
    cells = all_cell_boxes(plan)
    for a in plan.texts:
        assert not any(overlaps(a.box, cell) for cell in cells), a
        assert all(a is b or not overlaps(a.box, b.box) for b in plan.texts), a
    with pytest.raises(ValueError, match="captions must be"):
        layout([GridBlock("", ["r"], ["c"], [[noise((8, 8), 0)]], captions=[["a", "b"]])])


def test_small_cells_are_enlarged_by_a_whole_factor_without_new_detail():
    small = noise((64, 48), 3)
    big = grid.readable(small)
    assert big.size == (64 * 3, 48 * 3)  # the short side reaches MIN_CELL_SIDE (128)
    assert big.resize(small.size, Image.Resampling.NEAREST).tobytes() == small.tobytes()
    large = noise((200, 150), 4)
    assert grid.readable(large) is large
