"""``locus sim``: generate an HPA-sim dataset (fields of view with per-cell ground truth)."""

from __future__ import annotations

import argparse
import sys
import time

from locus.training.sim.generator import SimConfig, write_dataset

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``locus sim`` options to ``parser``.

    Parameters
    ----------
    parser : argparse.ArgumentParser
        The subcommand's parser.
    """
    parser.add_argument("--n", type=int, default=200, help="number of fields of view (default 200)")
    parser.add_argument("--size", type=int, default=2048, help="field side in pixels (default 2048, as real HPA)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed; field i depends only on (seed, i)")
    parser.add_argument("--out", required=True, help="output folder (Locus dataset layout, docs/CONTRACTS.md)")
    parser.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="channel PNG bit depth")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--start", type=int, default=0, help="index of the first field (default 0)")
    parser.add_argument("--cell-scale", type=float, default=1.0, help="multiplier on cell size (default 1.0)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument(
        "--cell-diameter",
        type=float,
        default=None,
        metavar="PX",
        help="median cell diameter in pixels, independent of --size (default: follows --size, ~0.16 x size)",
    )
    scale.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        metavar="UM",
        help="pixel size in micrometres (HPA confocal: 0.08; cells ~27 um across); independent of --size",
    )
    parser.add_argument("--mitotic-fraction", type=float, default=0.03, help="share of mitotic cells")
    parser.add_argument("--noise", type=float, default=1.0, help="noise multiplier (0: none)")
    parser.add_argument(
        "--extra-label-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="probability that a field gets one more, randomly drawn localisation (mixtures; default 0)",
    )
    parser.add_argument(
        "--diffuse-partner-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="probability that a field without nucleoplasm or cytosol gains one of them (default 0)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Generate the dataset described by ``args``.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed options from :func:`configure_parser`.

    Returns
    -------
    int
        Exit status: 0 on success, 2 on invalid options.
    """
    if args.n < 1:
        sys.stderr.write("locus sim: --n must be at least 1\n")
        return 2
    if args.workers < 1:
        sys.stderr.write("locus sim: --workers must be at least 1\n")
        return 2
    try:
        config = SimConfig(
            size=args.size,
            bit_depth=args.bit_depth,
            cell_scale=args.cell_scale,
            mitotic_fraction=args.mitotic_fraction,
            noise=args.noise,
            extra_label_rate=args.extra_label_rate,
            diffuse_partner_rate=args.diffuse_partner_rate,
            cell_diameter_px=getattr(args, "cell_diameter", None),
            pixel_size_um=getattr(args, "pixel_size", None),
        )
    except ValueError as exc:
        sys.stderr.write(f"locus sim: {exc}\n")
        return 2
    t0 = time.perf_counter()
    out = write_dataset(
        args.out, args.n, args.seed, config, workers=args.workers, progress=not args.no_progress, start=args.start
    )
    dt = time.perf_counter() - t0
    print(f"wrote {args.n} fields of {args.size}x{args.size} ({args.bit_depth}-bit) to {out} in {dt:.1f} s")
    return 0
