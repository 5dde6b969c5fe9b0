"""``unetrpp overlay``: a PNG of three orthogonal slices with the labels and a legend."""

from __future__ import annotations

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "overlay", help="draw a label map over its image (three orthogonal slices) into a PNG",
        description="Axial, coronal and sagittal slices through the label's centre of mass, with a colour legend "
                    "by class name (from --dataset's dataset.json, if given).")
    p.add_argument("image", help="image file or DICOM folder (first channel is drawn)")
    p.add_argument("label", help="label map with the image's grid")
    p.add_argument("out", help="output .png")
    p.add_argument("--dataset", help="dataset folder whose dataset.json names the labels")
    p.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from ..io import read_image
    from ..viz import write_overlay

    image, geometry = read_image(args.image)
    label, lgeom = read_image(args.label)
    image = image[0] if image.ndim == 4 else image
    if image.shape != label.shape:
        raise UserError(f"{args.label}: shape {label.shape} differs from the image's {image.shape}")
    if why := geometry.mismatch(lgeom):
        raise UserError(f"{args.label}: geometry differs from the image: {why}")
    names = None
    if args.dataset:
        from ..data.layout import read_labels

        names = {v: k for k, v in read_labels(Path(args.dataset) / "dataset.json").items()}
    if not str(args.out).lower().endswith(".png"):
        raise UserError(f"{args.out}: the output must be a .png file")
    write_overlay(image, label.astype("int64"), geometry.spacing_zyx, args.out, names, title=Path(args.label).name)
    print(f"wrote {args.out}")
    return 0
