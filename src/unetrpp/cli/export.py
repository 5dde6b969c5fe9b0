"""``unetrpp export``: the trained network as ONNX, checked against onnxruntime."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint's network to ONNX (checked with onnxruntime)",
        description="Exports the full-resolution logits of the network at its training patch size (batch axis "
                    "dynamic) and compares onnxruntime's output with torch's on a random input. Needs "
                    "pip install 'unetrpp[export]'.")
    p.add_argument("checkpoint", help="checkpoint (.pt) written by `unetrpp train`")
    p.add_argument("out", help="output .onnx file")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..inference.export import export_onnx

    r = export_onnx(args.checkpoint, args.out, opset=args.opset, check=not args.no_check)
    extra = f", max |onnxruntime - torch| = {r['max_abs_diff']:.2e}" if "max_abs_diff" in r else ""
    print(f"wrote {r['path']}: input (batch, {r['in_channels']}, {', '.join(map(str, r['patch_size']))}), "
          f"{r['classes']} classes, opset {r['opset']}{extra}")
    return 0
