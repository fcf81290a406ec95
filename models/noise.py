"""Where the random numbers come from.

A smoothed prediction draws, for every noisy copy (a "row"), Gaussian input noise and, with PNI
layers, Gaussian weight noise. A :class:`NoiseSource` hands those draws out row by row, so that

* with :class:`DeviceNoise` every row is an independent draw from the device's own generator
  (the production path: one ``randn`` call per tensor, on the model's device), and
* with :class:`SeededNoise` every row owns a generator seeded from (image seed, copy index), so a
  seeded image gets bit-for-bit the same noise whatever other images share its batch and however
  the engine chunks the rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MASK64 = (1 << 64) - 1


def row_seed(image_seed: int, copy_index: int) -> int:
    """Mix an image seed and a copy index into one 63-bit seed (SplitMix64 finaliser)."""
    z = (image_seed * 0x9E3779B97F4A7C15 + copy_index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


class NoiseSource:
    """Hands out standard-normal noise with one leading axis of length ``rows``."""

    rows: int

    def normal(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return a tensor of shape ``(rows, *shape)`` of independent N(0, 1) draws."""
        raise NotImplementedError


class DeviceNoise(NoiseSource):
    """Independent draws for every row from the device's generator (or a given one)."""

    def __init__(self, rows: int, device: torch.device | str, generator: torch.Generator | None = None):
        self.rows = rows
        self.device = torch.device(device)
        self.generator = generator

    def normal(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(
            (self.rows, *shape), device=self.device, dtype=dtype, generator=self.generator
        )


class SeededNoise(NoiseSource):
    """One generator per row, seeded by :func:`row_seed`; draws happen in a fixed order per row.

    Slower than :class:`DeviceNoise` (a small ``randn`` per row and tensor), which is why it is only
    used when a caller asks for reproducible answers.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str):
        self.rows = len(seeds)
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]

    @classmethod
    def for_copies(
        cls, image_seeds: Sequence[int], copy_ranges: Sequence[tuple[int, int]], device: torch.device | str
    ) -> SeededNoise:
        """Rows for copies ``[start, stop)`` of each seeded image, in order."""
        seeds = [
            row_seed(seed, j)
            for seed, (start, stop) in zip(image_seeds, copy_ranges, strict=True)
            for j in range(start, stop)
        ]
        return cls(seeds, device)

    def normal(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        draws = [
            torch.randn(tuple(shape), device=self.device, dtype=dtype, generator=g)
            for g in self.generators
        ]
        return torch.stack(draws) if draws else torch.empty((0, *shape), device=self.device, dtype=dtype)
