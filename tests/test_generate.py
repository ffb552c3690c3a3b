"""The one image generator (`esd.evaluate.generate`) and the one grid builder (`esd.grids`)."""

import numpy as np
from PIL import Image

from esd.evaluate.generate import generate, generate_product
from esd.grids import LABEL_PAD, beside, make_grid

PROMPTS = ["a red circle", "a blue square", "a green triangle"]
SEEDS = [0, 1, 7]


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_batched_images_equal_one_at_a_time(tiny_pipe):
    tiny_pipe.set_progress_bar_config(disable=True)
    # batch_size 4 over 9 images: calls of 4, 4 and 1, so batches mix prompts and seeds
    batched = generate_product(tiny_pipe, PROMPTS, SEEDS, steps=3, batch_size=4)
    single = [generate(tiny_pipe, [p], [s], steps=3)[0] for p in PROMPTS for s in SEEDS]
    assert len(batched) == len(single) == len(PROMPTS) * len(SEEDS)
    diffs = [np.abs(_pixels(a) - _pixels(b)).max() for a, b in zip(batched, single, strict=True)]
    # Measured: max 1 (0 or 1 per image) here and on the shipped testbed: batched convolutions and attention
    # add in another order, which moves a float by an ulp and, rarely, a pixel across a rounding boundary.
    assert max(diffs) <= 2, diffs


def test_product_is_prompt_major_and_seeds_matter(tiny_pipe):
    tiny_pipe.set_progress_bar_config(disable=True)
    images = generate_product(tiny_pipe, PROMPTS[:2], [0, 1], steps=2, batch_size=8)
    paired = generate(tiny_pipe, [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]], [0, 1, 0, 1], steps=2)
    assert all(np.abs(_pixels(a) - _pixels(b)).max() <= 2 for a, b in zip(images, paired, strict=True))
    # same prompt, different seeds: different initial noise, different images (not a rounding difference)
    assert np.abs(_pixels(images[0]) - _pixels(images[1])).mean() > 10


def test_progress_counts_images_not_batches(tiny_pipe, capsys):
    tiny_pipe.set_progress_bar_config(disable=True)
    generate_product(tiny_pipe, PROMPTS, [0], steps=1, batch_size=2, progress=True)
    err = capsys.readouterr().err
    # the total is the images (3, made in batches of 2 and 1), not the batches (2)
    assert "images:" in err and "0/3" in err and "image/s" in err and "/2 " not in err, err


def _solid(colour: tuple[int, int, int], size: int = 8) -> Image.Image:
    """A small image with one marked pixel, so a misplaced or mirrored paste shows."""
    image = Image.new("RGB", (size, size), colour)
    image.putpixel((0, 0), (255, 255, 255))
    return image


def test_grid_cells_without_labels_are_the_images_scaled_up():
    images = [_solid((200, 0, 0)), _solid((0, 200, 0)), _solid((0, 0, 200))]
    grid = make_grid(images, cols=2, scale=3)
    assert grid.size == (2 * 24, 2 * 24)  # 3 images, 2 columns: 2 rows; the last cell stays white
    for i, image in enumerate(images):
        x, y = (i % 2) * 24, (i // 2) * 24
        cell = grid.crop((x, y, x + 24, y + 24))
        assert np.array_equal(_pixels(cell), _pixels(image.resize((24, 24), Image.NEAREST)))
    assert (_pixels(grid.crop((24, 24, 48, 48))) == 255).all()


def test_grid_labels_go_in_margins_and_cells_stay_untouched():
    images = [_solid((200, 0, 0)), _solid((0, 200, 0)), _solid((0, 0, 200)), _solid((90, 90, 0))]
    grid = make_grid(images, cols=2, row_labels=["a long row label", "b"], col_labels=["seed 0", "seed 1"], cell=32)
    left, top = grid.width - 2 * 32, grid.height - 2 * 32
    assert left > 2 * LABEL_PAD and top > 2 * LABEL_PAD  # room for the labels, left and on top
    for i, image in enumerate(images):
        x, y = left + (i % 2) * 32, top + (i // 2) * 32
        assert np.array_equal(_pixels(grid.crop((x, y, x + 32, y + 32))),
                              _pixels(image.resize((32, 32), Image.NEAREST)))
    pixels = _pixels(grid)
    assert (pixels[top:, :left] < 128).any() and (pixels[:top, left:] < 128).any()  # text drawn in both margins
    assert (pixels[:top, :left] == 255).all()  # the corner stays blank


def test_grid_scales_large_images_down_and_leaves_blank_cells():
    big = Image.new("RGB", (64, 64), (10, 20, 30))
    grid = make_grid([big, None, big], cols=3, cell=16)
    assert grid.size == (48, 16)
    assert (_pixels(grid.crop((0, 0, 16, 16))) == (10, 20, 30)).all()
    assert (_pixels(grid.crop((16, 0, 32, 16))) == 255).all()


def test_beside_puts_a_gap_between_two_pictures():
    a, b = Image.new("RGB", (10, 6), "red"), Image.new("RGB", (4, 9), "blue")
    out = beside(a, b, gap=3)
    assert out.size == (17, 9)
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((12, 0)) == (255, 255, 255)
    assert out.getpixel((13, 8)) == (0, 0, 255)
