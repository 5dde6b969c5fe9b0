"""``unetrpp export-model``: one file to hand to a colleague: weights, network, plans, labels, postprocessing."""

from __future__ import annotations

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export-model", help="pack trained runs into one model package (.zip) that predict runs from",
        description="Writes a model package: safetensors weights and the JSON network config, plans and training "
                    "summary of each run (several runs: an ensemble), the labels, the postprocessing find-best "
                    "chose for these runs and its cross-validation summary. No pickle anywhere. `unetrpp predict "
                    "-m MODEL.zip` predicts from it; `unetrpp show-model MODEL.zip` says what is inside.")
    p.add_argument("models", nargs="+", metavar="RUN",
                   help="run folders, checkpoints (.pt) or packages, then the output MODEL.zip (or a folder)")
    p.add_argument("--postprocessing", metavar="JSON",
                   help="postprocessing.json to include ('none': none; default: the one find-best wrote for the runs)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")
    p.set_defaults(run=run)


def run(args) -> int:

    from ..inference.model import check_package_target, load_model, write_package

    if len(args.models) < 2:
        raise UserError("give the run folder(s) and then the package to write, e.g. "
                         "`unetrpp export-model D/results/unetrpp_fold0 model.zip`")
    *sources, target = args.models
    target = check_package_target(target, sources, args.overwrite)
    model = load_model(sources, postprocessing=args.postprocessing)
    members = [(m.name, m.network.config.to_dict(), m.plans.to_dict(), m.network.state_dict(),
                {**m.training, "source": m.source}) for m in model.members]
    write_package(target, members, model.labels, model.channel_names, model.postprocessing, model.evaluation)
    size = sum(f.stat().st_size for f in target.rglob("*")) if target.is_dir() else target.stat().st_size
    print(f"wrote {target} ({len(members)} network(s), {size / 1e6:.1f} MB"
          + (", with postprocessing)" if model.postprocessing else ")"))
    return 0
