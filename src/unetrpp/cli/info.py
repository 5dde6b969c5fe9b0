"""``unetrpp info PRESET``: parameters, multiply-adds, per-stage costs, tokens, activation memory."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="parameters, multiply-adds and memory of a preset",
                       description="Parameters, multiply-adds (MACs) and FLOPs, per-stage breakdown, token "
                                   "counts and activation memory of a preset, optionally at another patch size.")
    p.add_argument("preset", help="preset name (synapse, btcv, acdc, tumor, lung)")
    p.add_argument("--patch-size", nargs=3, type=int, metavar=("Z", "Y", "X"), help="patch size to build for")
    p.add_argument("--no-memory", action="store_true", help="skip the activation-memory measurement")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def _g(n: float) -> str:
    return f"{n / 1e9:8.3f} G"


def run(args) -> int:

    from ..network import create_model, get_preset
    from ..network.analysis import profile_model

    overrides = {"img_size": tuple(args.patch_size)} if args.patch_size else {}
    model = create_model(args.preset, **overrides)
    prof = profile_model(model, with_memory=not args.no_memory)
    if args.json:
        out = {
            "preset": args.preset, "config": prof.config, "params": prof.params, "macs": prof.macs,
            "flops": prof.flops, "macs_by_kind": prof.macs_by_kind,
            "stages": [vars(s) for s in prof.stages], "activation_bytes_train_batch1": prof.activation_bytes,
        }
        print(json.dumps(out, indent=2))
        return 0
    cfg = model.config
    print(f"UNETR++ preset '{args.preset}': patch {tuple(cfg.img_size)}, {cfg.in_channels} input channel(s), "
          f"{cfg.out_channels} classes")
    print(f"  variant: kv_proj={cfg.kv_proj}, fusion={cfg.fusion}, conv_blocks={cfg.conv_blocks}, "
          f"stem_stride={tuple(cfg.stem_stride)}, head_merge={cfg.head_merge}")
    official = get_preset(args.preset).official_params
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
