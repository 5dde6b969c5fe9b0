"""``unetrpp convert-weights``: an official UNETR++ checkpoint -> our safetensors + config.json folder."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "convert-weights", help="convert an official UNETR++ checkpoint",
        description="Convert an official UNETR++ checkpoint (model_final_checkpoint.model or a state_dict) "
                    "into a folder with model.safetensors and config.json, loadable with "
                    "UNETRPP.from_pretrained(OUT). No pickled code is executed while reading.")
    p.add_argument("official_file", help="official checkpoint file")
    p.add_argument("out", help="output folder")
    p.add_argument("--preset", required=True, help="the official configuration: synapse, btcv, acdc, tumor, lung")
    p.add_argument("--patch-size", nargs=3, type=int, metavar=("Z", "Y", "X"),
                   help="patch size the checkpoint was trained with, if not the preset's")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..network.weights import load_official

    model = load_official(args.official_file, args.preset, img_size=args.patch_size)
    out = model.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {args.official_file} -> {out} (preset {args.preset}, {n:,} parameters, "
          f"patch {tuple(model.config.img_size)})")
    return 0
