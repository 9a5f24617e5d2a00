"""The 19 classes of the HPA single-cell task, in the competition's order."""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = (
    "Nucleoplasm",
    "Nuclear membrane",
    "Nucleoli",
    "Nucleoli fibrillar center",
    "Nuclear speckles",
    "Nuclear bodies",
    "Endoplasmic reticulum",
    "Golgi apparatus",
    "Intermediate filaments",
    "Actin filaments",
    "Microtubules",
    "Mitotic spindle",
    "Centrosome",
    "Plasma membrane",
    "Mitochondria",
    "Aggresome",
    "Cytosol",
    "Vesicles and punctate cytosolic patterns",
    "Negative",
)
"""Class names indexed by class id (0-18), exactly as in the Kaggle 2021 task."""

NUM_CLASSES: int = len(CLASS_NAMES)
NEGATIVE: int = 18
"""Class id of 'Negative' (no specific staining)."""

CHANNELS: tuple[str, ...] = ("red", "green", "blue", "yellow")
"""Channel order of every HxWx4 array in Locus: microtubules, protein, nucleus, ER."""


def parse_label(text: str) -> list[int]:
    """Parse a Kaggle label string such as ``"0|16"`` into sorted class ids.

    Parameters
    ----------
    text : str
        ``|``-separated class ids; empty means no label.

    Returns
    -------
    list of int
        Sorted unique class ids.

    Raises
    ------
    ValueError
        If an id is not an integer in 0-18.
    """
    text = str(text).strip()
    if not text:
        return []
    ids = sorted({int(part) for part in text.split("|")})
    for i in ids:
        if not 0 <= i < NUM_CLASSES:
            raise ValueError(f"class id {i} is outside 0-{NUM_CLASSES - 1}")
    return ids


def format_label(ids: list[int] | tuple[int, ...] | set[int]) -> str:
    """Format class ids as a Kaggle label string (sorted, ``|``-separated).

    Parameters
    ----------
    ids : iterable of int
        Class ids.

    Returns
    -------
    str
        For example ``"0|16"``.
    """
    return "|".join(str(i) for i in sorted(set(int(i) for i in ids)))
