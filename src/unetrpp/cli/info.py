"""``unetrpp info PRESET``: parameters, multiply-adds, per-stage costs, tokens, activation memory."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="parameters, multiply-adds and memory of a network",
                       description="Parameters, multiply-adds (MACs) and FLOPs, per-stage breakdown, token "
                                   "counts and activation memory of a UNETR++ preset, of a baseline architecture "
                                   "(nnunet, resenc, swinunetr, unetr; planned for --patch-size and --spacing as "
                                   "`plan --arch` plans it), or of the network in a plans.json, dataset folder, "
                                   "checkpoint or run folder.")
    p.add_argument("preset", metavar="NAME",
                   help="preset (synapse, btcv, acdc, tumor, lung), architecture, or plans/dataset/checkpoint/run path")
    p.add_argument("--patch-size", nargs=3, type=int, metavar=("Z", "Y", "X"),
                   help="patch size to build for (an architecture: default 64 128 128, the Synapse patch)")
    p.add_argument("--spacing", nargs=3, type=float, metavar=("Z", "Y", "X"), default=(1.0, 1.0, 1.0),
                   help="an architecture: the spacing its U-Net topology is planned for (default 1 1 1 mm)")
    p.add_argument("--in-channels", type=int, default=1, help="an architecture: input channels (default 1)")
    p.add_argument("--classes", type=int, default=14, help="an architecture: classes with background (default 14)")
    p.add_argument("--no-memory", action="store_true", help="skip the activation-memory measurement")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def _network(args) -> tuple[dict, str]:
    """The network dict NAME names, and how to call it."""
    from pathlib import Path

    from ..data.plan import plan_baseline
    from ..errors import UserError
    from ..network.registry import ARCHITECTURES

    name = args.preset
    if name in ARCHITECTURES and name != "unetrpp":
        patch = list(args.patch_size or (64, 128, 128))
        network, _ = plan_baseline(name, args.in_channels, args.classes, list(args.spacing), patch, patch,
                                   10**12, [])
        return network, f"architecture '{name}'"
    path = Path(name)
    if not path.exists():
        raise UserError(f"{name}: not a preset, an architecture ({', '.join(ARCHITECTURES[1:])}) or a path")
    from ..checkpoint import Checkpoint
    from ..data.plans import Plans

    plans_only = path.is_dir() and (path / "plans.json").is_file() and not (path / "checkpoint_final.pt").is_file()
    if plans_only or path.suffix == ".json":
        network = dict(Plans.load(path).network)
    else:
        ckpt = path / "checkpoint_final.pt" if path.is_dir() else path
        network = dict(Checkpoint.load(ckpt).network)
    if args.patch_size:
        network["img_size"] = list(args.patch_size)
    return network, str(path)


def _g(n: float) -> str:
    return f"{n / 1e9:8.3f} G"


def run(args) -> int:

    from ..network import PRESETS, UNETRPP, create_model, get_preset
    from ..network.analysis import profile_model
    from ..network.registry import build_checked

    if args.preset in PRESETS:
        overrides = {"img_size": tuple(args.patch_size)} if args.patch_size else {}
        model, what = create_model(args.preset, **overrides), f"UNETR++ preset '{args.preset}'"
    else:
        network, what = _network(args)
        model = build_checked(network, what)
        if isinstance(model, UNETRPP):
            what = f"UNETR++ of {what}"
    prof = profile_model(model, with_memory=not args.no_memory)
    if args.json:
        out = {
            "preset": args.preset, "arch": getattr(model.config, "arch", "unetrpp"), "config": prof.config,
            "params": prof.params, "macs": prof.macs,
            "flops": prof.flops, "macs_by_kind": prof.macs_by_kind,
            "stages": [vars(s) for s in prof.stages], "activation_bytes_train_batch1": prof.activation_bytes,
        }
        print(json.dumps(out, indent=2))
        return 0
    cfg = model.config
    print(f"{what}: patch {tuple(cfg.img_size)}, {cfg.in_channels} input channel(s), {cfg.out_channels} classes")
    if isinstance(model, UNETRPP):
        print(f"  variant: kv_proj={cfg.kv_proj}, fusion={cfg.fusion}, conv_blocks={cfg.conv_blocks}, "
              f"stem_stride={tuple(cfg.stem_stride)}, head_merge={cfg.head_merge}")
    else:
        topology = f", strides {cfg.strides[1:]}, kernels {cfg.kernel_sizes}" if cfg.strides else ""
        print(f"  {cfg.arch}: width {cfg.feature_size}{topology}")
    official = get_preset(args.preset).official_params if args.preset in PRESETS else None
    note = f"; official: {official:,}" if official is not None and not args.patch_size else ""
    print(f"  parameters:      {prof.params:,} ({prof.params / 1e6:.2f} M{note})")
    print(f"  multiply-adds:   {prof.macs / 1e9:.3f} G MACs   (the paper's 'FLOPs', fvcore convention)")
    print(f"  FLOPs:           {prof.flops / 1e9:.3f} G       (2 x MACs)")
    kinds = ", ".join(f"{k} {v / 1e9:.2f} G" for k, v in sorted(prof.macs_by_kind.items()))
    print(f"  MACs by kind:    {kinds}")
    if prof.activation_bytes is not None:
        print(f"  activations kept for backward (training, batch 1): {prof.activation_bytes / 2**30:.2f} GiB")
    print()
    print(f"  {'stage':<14}{'description':<42}{'params':>12}{'MACs':>12}{'tokens':>9}  shape")
    for s in prof.stages:
        shape = "x".join(map(str, s.shape)) if s.shape else ""
        tokens = f"{s.tokens:,}" if s.tokens else ""
        print(f"  {s.name:<14}{s.description:<42}{s.params:>12,}{_g(s.macs):>12}{tokens:>9}  {shape}")
    return 0
