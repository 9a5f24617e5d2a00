"""The segmenter contract shared by every segmentation backend.

A segmenter turns one field of view into two label images at full resolution:

* ``cell_labels``: ``int32`` (H, W), 0 = background, cells numbered ``1..n``;
* ``nuclei_labels``: ``int32`` (H, W), nucleus ``k`` lies inside cell ``k``
  (a cell may lack a nucleus only where a backend says so).

The input is an (H, W, 4) array in R, G, B, Y order (microtubules, protein,
nucleus, ER), ``uint8`` or ``uint16``, as built by
:func:`locus.service.imaging.stack_channels`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Segmenter", "SegmentationError", "check_field"]


class SegmentationError(RuntimeError):
    """A field that a segmenter cannot segment, or a backend that cannot run.

    Parameters
    ----------
    message : str
        What went wrong and what to do about it.
    """


@runtime_checkable
class Segmenter(Protocol):
    """A segmentation backend.

    Attributes
    ----------
    name : str
        The backend's registry name (``"classical"``, ``"hpa"``, ...).
    nuclei_in_cells : bool
        Optional; True when the backend guarantees, pixel for pixel, that nucleus ``k`` lies inside
        cell ``k``, so callers need not enforce it with a full-resolution pass (absent: False).
    """

    name: str

    def segment(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment one field of view.

        Parameters
        ----------
        image : numpy.ndarray
            (H, W, 4) field in R, G, B, Y order, ``uint8`` or ``uint16``.

        Returns
        -------
        cell_labels : numpy.ndarray
            (H, W) ``int32``, 0 = background, cells ``1..n``.
        nuclei_labels : numpy.ndarray
            (H, W) ``int32``, nucleus ``k`` inside cell ``k``.
        """
        ...


def check_field(image: np.ndarray) -> np.ndarray:
    """Check that an array is a field a segmenter accepts.

    Parameters
    ----------
    image : numpy.ndarray
        Candidate (H, W, 4) field.

    Returns
    -------
    numpy.ndarray
        The same array.

    Raises
    ------
    SegmentationError
        Wrong number of dimensions or channels, an empty image, or an unsupported dtype.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 4:
        shape = getattr(image, "shape", None)
        raise SegmentationError(f"expected an (H, W, 4) R,G,B,Y field, got shape {shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise SegmentationError(f"the field is empty (shape {image.shape})")
    if image.dtype not in (np.uint8, np.uint16):
        raise SegmentationError(f"pixel type {image.dtype} is not supported; expected uint8 or uint16")
    return image
