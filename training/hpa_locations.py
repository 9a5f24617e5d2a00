"""HPA subcellular location names -> the 19 classes of the Kaggle 2021 single-cell task.

The Human Protein Atlas annotates each image with location names (``"Cytosol,Vesicles"``).
The 2021 competition folded some of them into its 19 classes (focal adhesion sites into
actin filaments, centriolar satellites into the centrosome, six kinds of small cytosolic
compartments into "vesicles and punctate cytosolic patterns", cell junctions into the
plasma membrane, "no staining" into Negative) and left the rest out. :data:`LOCATION_CLASSES`
is that table, with every HPA location name Locus knows; names the task has no class for
map to ``None``. The ``Label_idx`` column of ``kaggle_2021.tsv`` was made by the same rule;
this table is used where that column is missing and to read class filters given by name.
"""

from __future__ import annotations

from collections.abc import Iterable

from locus.service.classes import CLASS_NAMES, NUM_CLASSES

__all__ = [
    "LOCATION_CLASSES",
    "KAGGLE_CELL_LINES",
    "UnknownLocationError",
    "location_class",
    "locations_to_classes",
    "split_locations",
    "parse_class_filter",
]

#: HPA location name -> class id (0-18), or None where the 19-class task has no class for it.
LOCATION_CLASSES: dict[str, int | None] = {
    # nucleus
    "Nucleoplasm": 0,
    "Nuclear membrane": 1,
    "Nucleoli": 2,
    "Nucleoli fibrillar center": 3,
    "Nuclear speckles": 4,
    "Nuclear bodies": 5,
    "Nucleoli rim": None,
    "Kinetochore": None,
    "Mitotic chromosome": None,
    "Nucleus": None,  # the whole nucleus, used by older HPA versions: no single class
    # secretory pathway
    "Endoplasmic reticulum": 6,
    "Golgi apparatus": 7,
    "Vesicles": 17,
    "Peroxisomes": 17,
    "Endosomes": 17,
    "Lysosomes": 17,
    "Lipid droplets": 17,
    # cytoskeleton
    "Intermediate filaments": 8,
    "Actin filaments": 9,
    "Focal adhesion sites": 9,
    "Microtubules": 10,
    "Microtubule ends": None,
    "Mitotic spindle": 11,
    "Cytokinetic bridge": None,
    "Midbody": None,
    "Midbody ring": None,
    "Cleavage furrow": None,
    "Centrosome": 12,
    "Centriolar satellite": 12,
    "Microtubule organizing center": None,  # a separate HPA class before v18; the 2021 task has no rule for it
    "Primary cilium": None,
    "Primary cilium tip": None,
    "Primary cilium transition zone": None,
    "Basal body": None,
    # cell periphery
    "Plasma membrane": 13,
    "Cell Junctions": 13,
    # cytoplasm
    "Mitochondria": 14,
    "Aggresome": 15,
    "Cytosol": 16,
    "Cytoplasmic bodies": 17,
    "Rods & Rings": None,
    # no pattern
    "No staining": 18,
}

#: The 17 cell lines of the Kaggle 2021 training set (the public-data scripts kept these).
KAGGLE_CELL_LINES: tuple[str, ...] = (
    "A-431",
    "A549",
    "EFO-21",
    "HAP1",
    "HEK 293",
    "HUVEC TERT2",
    "HaCaT",
    "HeLa",
    "PC-3",
    "RH-30",
    "RPTEC TERT1",
    "SH-SY5Y",
    "SK-MEL-30",
    "SiHa",
    "U-2 OS",
    "U-251 MG",
    "hTCEpi",
)

_BY_KEY: dict[str, int | None] = {name.casefold(): cls for name, cls in LOCATION_CLASSES.items()}
_CLASS_BY_KEY: dict[str, int] = {name.casefold(): i for i, name in enumerate(CLASS_NAMES)}


class UnknownLocationError(ValueError):
    """A location name that is neither an HPA location in :data:`LOCATION_CLASSES` nor a class name."""


def location_class(name: str) -> int | None:
    """The class id of one HPA location name.

    Parameters
    ----------
    name : str
        An HPA location name (case and surrounding spaces ignored), or one of the 19
        class names themselves (``"Negative"``, ``"Vesicles and punctate cytosolic patterns"``).

    Returns
    -------
    int or None
        The class id (0-18), or None for a known location the task has no class for.

    Raises
    ------
    UnknownLocationError
        The name is not in the table (the message lists what is).
    """
    key = " ".join(str(name).split()).casefold()
    if key in _BY_KEY:
        return _BY_KEY[key]
    if key in _CLASS_BY_KEY:
        return _CLASS_BY_KEY[key]
    raise UnknownLocationError(
        f"unknown HPA location {name!r}; known names: {', '.join(LOCATION_CLASSES)} (or one of the 19 class names)"
    )


def split_locations(text: str) -> list[str]:
    """Split an HPA ``Label`` cell (``"Cytosol,Nucleoplasm"``) into location names.

    Parameters
    ----------
    text : str
        Names separated by ``,``, ``;`` or ``|``.

    Returns
    -------
    list of str
        The names, stripped, empty ones dropped.
    """
    parts = str(text).replace(";", ",").replace("|", ",").split(",")
    return [p.strip() for p in parts if p.strip()]


def locations_to_classes(names: Iterable[str], *, strict: bool = False) -> tuple[list[int], list[str]]:
    """Map HPA location names to class ids.

    Parameters
    ----------
    names : iterable of str
        Location names (see :func:`split_locations`).
    strict : bool
        Raise on a name outside the table instead of returning it as unmapped.

    Returns
    -------
    classes : list of int
        Sorted unique class ids of the mapped names.
    unmapped : list of str
        Names with no class (known but outside the task, or unknown when not ``strict``).

    Raises
    ------
    UnknownLocationError
        An unknown name and ``strict``.
    """
    classes: set[int] = set()
    unmapped: list[str] = []
    for name in names:
        try:
            cls = location_class(name)
        except UnknownLocationError:
            if strict:
                raise
            cls = None
        if cls is None:
            unmapped.append(name)
        else:
            classes.add(cls)
    return sorted(classes), unmapped


def parse_class_filter(values: Iterable[str]) -> set[int]:
    """Read a class filter given as ids, class names or HPA location names.

    Parameters
    ----------
    values : iterable of str
        Each an integer id (``"6"``), a class name (``"Golgi apparatus"``) or an HPA location
        name that maps to a class (``"Peroxisomes"`` -> 17); comma-separated lists allowed.

    Returns
    -------
    set of int
        The class ids.

    Raises
    ------
    ValueError
        An id outside 0-18, an unknown name, or a location the task has no class for.
    """
    out: set[int] = set()
    for value in values:
        for part in split_locations(value):
            if part.isdigit():
                cls = int(part)
                if not 0 <= cls < NUM_CLASSES:
                    raise ValueError(f"class id {cls} is outside 0-{NUM_CLASSES - 1}")
            else:
                cls = location_class(part)
                if cls is None:
                    raise ValueError(f"{part!r} is an HPA location the 19-class task has no class for")
            out.add(cls)
    return out
