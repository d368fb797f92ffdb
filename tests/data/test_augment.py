import re

import pytest
import torch

from still.data.augment import jitter, shift
from still.errors import StillError


def test_jitter_translates_each_image_by_at_most_the_shift():
    images = torch.rand(64, 28 * 28) + 0.1  # no zeros: the fill shows where the image moved
    out = jitter(images, 2, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    seen = set()
    for image, moved in zip(images, out):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(shift(image[None], dy, dx)[0], moved)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 15  # of the 25 shifts, drawn uniformly


def test_jitter_of_zero_pixels_is_the_identity():
    images = torch.rand(4, 28, 28)
    assert jitter(images, 0) is images


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_jitter_draws_on_the_cpu_wherever_the_images_are(device):
    """The shifts come from the CPU generator on every device (the meta device stands in for a GPU):
    the images stay where they are, and the generator moves on by the same draws."""
    generator = torch.Generator().manual_seed(5)
    out = jitter(torch.zeros(8, 28 * 28, device=device), 2, generator=generator)
    assert out.device.type == device and out.shape == (8, 28 * 28)
    reference = torch.Generator().manual_seed(5)
    jitter(torch.zeros(8, 28 * 28), 2, generator=reference)
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=reference))


def test_shift_and_jitter_name_images_that_are_not_size_by_size():
    """A 32x32 or colour image at size 28 met a raw reshape error; one channel of 28x28 is one image."""
    for shape in ((2, 32 * 32), (2, 3, 28, 28)):
        for move in (lambda images: shift(images, 1, 0), lambda images: jitter(images, 2)):
            with pytest.raises(StillError, match=re.escape(f"images of shape {shape} are not 28x28 (size=28)")):
                move(torch.zeros(shape))
    assert shift(torch.ones(2, 1, 28, 28), 1, 0).shape == (2, 1, 28, 28)
    assert jitter(torch.ones(2, 1, 28, 28), 2).shape == (2, 1, 28, 28)
