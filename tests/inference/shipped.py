"""The shipped package, as the CLI tests read it."""

import dataclasses

from inference.package import ModelPackage


def at_half_resolution(package: ModelPackage) -> ModelPackage:
    """``package`` with its ensemble reading studies at half the resolution (the shipped 256 px
    of 0.9375 mm become 128 px of 1.875 mm): the same networks, heads, readers, splits and
    points, a quarter of the pixels to read. For tests of what a command writes, refuses and
    shares, not of how well the ensemble reads; strip readers read the series as before."""
    package.preprocess = dataclasses.replace(
        package.preprocess,
        image_size=package.preprocess.image_size // 2,
        spacing_mm=package.preprocess.spacing_mm * 2,
    )
    return package
