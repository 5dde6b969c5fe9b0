"""``unetrpp show-model``: what a model package (or checkpoint, or run folder) holds and how it was trained."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "show-model", help="print what a model package, checkpoint or run folder holds and how it was trained",
        description="Labels, channels, each network (architecture, patch, spacing, normalisation, parameters), "
                    "how each was trained (recipe, epochs, time, device), the postprocessing and its "
                    "cross-validation summary.")
    p.add_argument("model", nargs="+", help="model package (.zip or folder), checkpoint (.pt) or run folder(s)")
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.set_defaults(run=run)


def describe_model(sources) -> dict:
    """A plain-JSON description of a model (what ``show-model`` prints)."""
    from pathlib import Path

    from ..inference.model import is_package, load_model, read_package

    header: dict = {}
    one = Path(sources[0]) if len(sources) == 1 else None
    if one is not None and is_package(one):
        model = read_package(sources[0])
        m = model.manifest
        header = {"kind": "model package", "format_version": m.get("version"),
                  "unetrpp_version": m.get("unetrpp_version"), "created": m.get("created")}
        if isinstance(m.get("imported_from"), (dict, str)):
            header["imported_from"] = m["imported_from"]
    else:
        model = load_model(sources)
        header = {"kind": "checkpoint" if len(sources) == 1 and Path(sources[0]).is_file() else "run folder(s)"}
    networks = []
    for mem in model.members:
        cfg = mem.network.config
        plans = mem.plans
        networks.append({
            "name": mem.name, "source": mem.source, "arch": getattr(cfg, "arch", "unetrpp"),
            "parameters": sum(p.numel() for p in mem.network.parameters()),
            "feature_size": cfg.feature_size, "patch": list(cfg.img_size),
            "stem_stride": list(cfg.stem_stride) if hasattr(cfg, "stem_stride") else None,
            "strides": getattr(cfg, "strides", None),
            "spacing_mm": list(plans.target_spacing),
            "normalization": [n.get("scheme") for n in plans.normalization],
            "training": mem.training,
        })
    return {"source": model.source, **header, "labels": model.labels, "channels": model.channel_names,
            "networks": networks, "postprocessing": model.postprocessing, "cross_validation": model.evaluation}


def run(args) -> int:
    import json

    info = describe_model(args.model)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    head = info["kind"]
    if info.get("format_version"):
        head += (f" (format {info['format_version']}, unetrpp {info.get('unetrpp_version')}, "
                 f"created {info.get('created')})")
    print(f"{info['source']}: {head}")
    print("labels: " + ", ".join(f"{v} {k}" for k, v in sorted(info["labels"].items(), key=lambda kv: kv[1])))
    print("channels: " + ", ".join(info["channels"]))
    print(f"networks: {len(info['networks'])}" + (" (an ensemble: probabilities averaged)"
                                                 if len(info["networks"]) > 1 else ""))
    for n in info["networks"]:
        kind = "UNETR++" if n["arch"] == "unetrpp" else n["arch"]
        print(f"  {n['name']}: {kind} width {n['feature_size']}, patch {n['patch']}, {n['parameters'] / 1e6:.2f} M "
              f"parameters; spacing {n['spacing_mm']} mm; normalisation {', '.join(map(str, n['normalization']))}")
        t = n["training"] if isinstance(n["training"], dict) else {}
        cfg = t.get("train_config") if isinstance(t.get("train_config"), dict) else {}
        bits = []
        if cfg:
            bits.append(f"{cfg.get('recipe')} recipe, {cfg.get('optimizer')} lr {cfg.get('lr')}, "
                        f"fold {cfg.get('fold')}, {cfg.get('device')}")
        if "epochs" in t:
            bits.append(f"{t['epochs']} epoch(s), {t.get('iterations')} iterations")
        if _number(t.get("elapsed")):
            bits.append(f"{t['elapsed'] / 60:.1f} min")
        if _number(t.get("best_ema")):
            bits.append(f"best pseudo-Dice (EMA) {t['best_ema']:.4f}")
        if t.get("imported_from"):
            bits.append(f"imported from {t['imported_from']}")
        if bits:
            print("    trained: " + "; ".join(bits))
    post = info["postprocessing"]
    if post:
        from ..inference.postprocess import describe

        print(f"postprocessing: {describe(post)}")
        for line in post.get("decisions", []):
            print(f"  {line}")
    else:
        print("postprocessing: none")
    cv = info["cross_validation"]  # validated on reading: numbers or null
    if cv:
        names = (post or {}).get("class_names") or {}
        print(f"cross-validation: {cv.get('cases')} case(s), mean Dice {_dice(cv.get('mean_dice_before'))} -> "
              f"{_dice(cv.get('mean_dice_after'))} with postprocessing")
        after = cv.get("dice_after") or {}
        for c, before in (cv.get("dice_before") or {}).items():
            print(f"  {names.get(c, c)}: {_dice(before)} -> {_dice(after.get(c))}")
    return 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _dice(v) -> str:
    return f"{v:.4f}" if _number(v) else "n/a"
