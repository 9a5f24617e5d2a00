"""``locus hpa-export``: HPA's official segmentation weights -> ONNX files for the ``hpa`` backend.

HPA-Cell-Segmentation ships its two networks (DPN92-encoder U-Nets; Zenodo
record 4665863) as whole pickled PyTorch modules: ``dpn_unet_nuclei_v1.pth`` and
``dpn_unet_cell_3ch_v1.pth``. Unpickling them needs the classes they were
pickled from, i.e. ``hpacellseg`` and ``pytorch_zoo`` importable (both install
from GitHub, see the README), and ``torch.load(..., weights_only=False)`` (torch
>= 2.6 refuses whole modules by default; the files are HPA's own).

Each network is wrapped with the softmax that ``hpacellseg`` applies to its
output, exported with opset 17 and dynamic N, H and W (H, W multiples of 32),
input ``input`` float32 [N, 3, H, W] and output ``probabilities`` [N, 3, H, W];
then ONNX Runtime (CPU) is checked against torch on random inputs of two sizes
(max abs difference <= ``--atol``, 1e-4 by default). torch is needed only here,
never by the service.

Examples
--------
``locus hpa-export --download --out-dir models/hpa`` then
``LOCUS_SEGMENTER=hpa LOCUS_HPA_NUCLEI_MODEL=models/hpa/dpn_unet_nuclei_v1.onnx
LOCUS_HPA_CELL_MODEL=models/hpa/dpn_unet_cell_3ch_v1.onnx locus serve``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "WEIGHTS",
    "ExportError",
    "ExportReport",
    "check_parity",
    "configure_parser",
    "convert",
    "download_weights",
    "export_network",
    "load_pickled_module",
    "run",
]

log = logging.getLogger("locus.hpa_export")

#: network -> (official weights file, ONNX file written)
WEIGHTS: dict[str, tuple[str, str]] = {
    "nuclei": ("dpn_unet_nuclei_v1.pth", "dpn_unet_nuclei_v1.onnx"),
    "cell": ("dpn_unet_cell_3ch_v1.pth", "dpn_unet_cell_3ch_v1.onnx"),
}
ZENODO_URL = "https://zenodo.org/records/4665863/files/{name}?download=1"
INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"


class ExportError(RuntimeError):
    """The weights cannot be loaded or exported, or ONNX Runtime disagrees with torch."""


@dataclass
class ExportReport:
    """What one conversion did."""

    network: str
    weights: str
    onnx: str
    opset: int
    max_abs_diff: float
    atol: float
    checked_shapes: list[list[int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether ONNX Runtime matched torch within ``atol``."""
        return self.max_abs_diff <= self.atol


def _torch():
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ExportError(
            "locus hpa-export needs torch (the [hpa] extra): pip install -e '.[hpa]' "
            "(and hpacellseg + pytorch_zoo from GitHub to unpickle HPA's modules, see the README)"
        ) from exc
    return torch


def load_pickled_module(path: str | Path) -> Any:
    """Load a whole pickled torch module (as HPA ships its networks) on the CPU, in eval mode.

    Parameters
    ----------
    path : str or Path
        The ``.pth`` file.

    Returns
    -------
    torch.nn.Module
        The module, unwrapped from ``DataParallel`` when it was saved wrapped.

    Raises
    ------
    ExportError
        The file is missing, the classes it was pickled from are not importable, or it holds no module.
    """
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} does not exist (fetch it with --download, or from Zenodo record 4665863)")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise ExportError(
            f"{path}: unpickling needs the classes the module was saved from ({exc}); install hpacellseg and "
            "pytorch_zoo from GitHub: pip install git+https://github.com/haoxusci/pytorch_zoo@master#egg=pytorch_zoo "
            "git+https://github.com/CellProfiling/HPA-Cell-Segmentation.git"
        ) from exc
    if isinstance(obj, torch.nn.DataParallel):
        obj = obj.module
    if not isinstance(obj, torch.nn.Module):
        raise ExportError(f"{path} holds a {type(obj).__name__}, not a whole torch module")
    return obj.eval()


def _with_softmax(module: Any) -> Any:
    """``module`` followed by a softmax over the class axis, as ``hpacellseg`` applies it."""
    torch = _torch()

    class SoftmaxHead(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.net(x), dim=1)

    return SoftmaxHead(module).eval()


def export_network(
    module: Any, out_path: str | Path, opset: int = 17, example_size: int = 256, softmax: bool = True
) -> Path:
    """Export a segmentation network to ONNX with dynamic N, H and W.

    Parameters
    ----------
    module : torch.nn.Module
        Takes [N, 3, H, W] float32 (H, W multiples of 32), returns [N, 3, H, W] logits (or probabilities).
    out_path : str or Path
        The ONNX file to write.
    opset : int
        ONNX opset.
    example_size : int
        Side of the example input used for tracing (a multiple of 32).
    softmax : bool
        Append the softmax over the class axis (HPA's networks return logits).

    Returns
    -------
    Path
        The written file.
    """
    torch = _torch()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    net = _with_softmax(module) if softmax else module.eval()
    example = torch.zeros((1, 3, example_size, example_size), dtype=torch.float32)
    with torch.no_grad():
        torch.onnx.export(
            net,
            (example,),
            str(out_path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_axes={INPUT_NAME: {0: "N", 2: "H", 3: "W"}, OUTPUT_NAME: {0: "N", 2: "H", 3: "W"}},
            dynamo=False,
            do_constant_folding=True,
        )
    return out_path


def check_parity(
    module: Any,
    onnx_path: str | Path,
    shapes: tuple[tuple[int, int, int], ...] = ((1, 256, 256), (2, 192, 320)),
    softmax: bool = True,
    seed: int = 0,
) -> tuple[float, list[list[int]]]:
    """Largest absolute difference between ONNX Runtime (CPU) and torch on random normalised inputs.

    Parameters
    ----------
    module : torch.nn.Module
        The network as exported (before the softmax).
    onnx_path : str or Path
        The exported file.
    shapes : tuple of (N, H, W)
        Input sizes checked (H, W multiples of 32); two different sizes check the dynamic axes.
    softmax : bool
        Whether the export appended the softmax.
    seed : int
        Seed of the random inputs.

    Returns
    -------
    max_abs_diff : float
        Over all checked outputs.
    checked : list of list of int
        The input shapes checked.
    """
    import onnxruntime as ort

    torch = _torch()
    net = _with_softmax(module) if softmax else module.eval()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    worst = 0.0
    checked = []
    for n, h, w in shapes:
        x = rng.normal(0.0, 1.0, size=(n, 3, h, w)).astype(np.float32)
        with torch.no_grad():
            ref = net(torch.from_numpy(x)).numpy()
        (got,) = sess.run([OUTPUT_NAME], {INPUT_NAME: x})
        if got.shape != ref.shape:
            raise ExportError(f"{onnx_path}: ONNX Runtime output shape {got.shape} != torch {ref.shape}")
        worst = max(worst, float(np.max(np.abs(got - ref))))
        checked.append([n, 3, h, w])
    return worst, checked


def convert(
    weights: str | Path,
    out_path: str | Path,
    network: str = "",
    opset: int = 17,
    atol: float = 1e-4,
    check_shapes: tuple[tuple[int, int, int], ...] = ((1, 256, 256), (2, 192, 320)),
    softmax: bool = True,
) -> ExportReport:
    """Load one pickled network, export it to ONNX and check ONNX Runtime against torch.

    Parameters
    ----------
    weights : str or Path
        The pickled module (``.pth``).
    out_path : str or Path
        The ONNX file to write.
    network : str
        Name for the report (``nuclei`` or ``cell``).
    opset : int
        ONNX opset.
    atol : float
        Largest accepted absolute difference.
    check_shapes : tuple of (N, H, W)
        Input sizes of the parity check.
    softmax : bool
        Append the softmax over the class axis.

    Returns
    -------
    ExportReport
        Files, opset and the measured difference.

    Raises
    ------
    ExportError
        Loading or export failed, or the difference exceeds ``atol`` (the ONNX file is removed).
    """
    module = load_pickled_module(weights)
    path = export_network(module, out_path, opset=opset, softmax=softmax)
    diff, checked = check_parity(module, path, check_shapes, softmax=softmax)
    report = ExportReport(
        network=network or Path(weights).stem,
        weights=str(weights),
        onnx=str(path),
        opset=opset,
        max_abs_diff=diff,
        atol=atol,
        checked_shapes=checked,
    )
    if not report.ok:
        path.unlink(missing_ok=True)
        raise ExportError(f"{weights}: ONNX Runtime differs from torch by {diff:.3g} > {atol:g}; {path} removed")
    return report


def download_weights(directory: str | Path, names: list[str] | None = None, url: str = ZENODO_URL) -> list[Path]:
    """Download HPA's official weights (Zenodo record 4665863) into a folder; existing files are kept.

    Parameters
    ----------
    directory : str or Path
        Destination folder.
    names : list of str, optional
        File names (default both networks).
    url : str
        URL template with ``{name}``.

    Returns
    -------
    list of Path
        The weight files.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names or [w for w, _ in WEIGHTS.values()]:
        dest = directory / name
        if not dest.is_file():
            tmp = dest.with_suffix(dest.suffix + ".part")
            log.info("downloading %s", url.format(name=name))
            with urllib.request.urlopen(url.format(name=name), timeout=60) as resp, tmp.open("wb") as fh:
                shutil.copyfileobj(resp, fh, length=1 << 20)
            tmp.replace(dest)
        out.append(dest)
    return out


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``hpa-export`` options."""
    parser.add_argument(
        "--weights-dir",
        type=Path,
        default=Path("models/hpa"),
        help="folder with dpn_unet_nuclei_v1.pth and dpn_unet_cell_3ch_v1.pth (default models/hpa)",
    )
    parser.add_argument("--nuclei-weights", type=Path, default=None, help="nuclei network .pth (overrides the folder)")
    parser.add_argument("--cell-weights", type=Path, default=None, help="cell network .pth (overrides the folder)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where the ONNX files go (default: --weights-dir)")
    parser.add_argument("--download", action="store_true", help="fetch missing weights from Zenodo (4665863) first")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest ONNX Runtime vs torch difference accepted")
    parser.add_argument("--only", choices=sorted(WEIGHTS), default=None, help="convert one network only")


def run(args: argparse.Namespace) -> int:
    """Convert the networks; print one JSON report line per network and the settings to use.

    Returns
    -------
    int
        0 on success, 1 when a network failed (the message says why).
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    networks = [args.only] if args.only else list(WEIGHTS)
    out_dir = args.out_dir or args.weights_dir
    try:
        if args.download:
            download_weights(args.weights_dir, [WEIGHTS[n][0] for n in networks])
        reports = []
        for net in networks:
            given = args.nuclei_weights if net == "nuclei" else args.cell_weights
            weights = given or args.weights_dir / WEIGHTS[net][0]
            report = convert(weights, out_dir / WEIGHTS[net][1], network=net, opset=args.opset, atol=args.atol)
            reports.append(report)
            print(json.dumps(asdict(report)))
    except ExportError as exc:
        sys.stderr.write(f"locus hpa-export: {exc}\n")
        return 1
    if len(networks) == 2:
        print(f"LOCUS_SEGMENTER=hpa LOCUS_HPA_NUCLEI_MODEL={reports[0].onnx} LOCUS_HPA_CELL_MODEL={reports[1].onnx}")
    return 0
