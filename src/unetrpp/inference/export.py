"""ONNX export of a trained network at its patch size, checked against onnxruntime."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..io.atomic import atomic_path


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike, batch: int = 2, opset: int = 18,
                check: bool = True, atol: float = 1e-4) -> dict:
    """Write the full-resolution head's logits graph ``(batch, C, *patch) -> (batch, K, *patch)`` to ``out``.

    The batch axis is dynamic (``batch`` is the example size traced). With ``check`` the file is run
    in onnxruntime on a random input and compared with torch; a difference above ``atol`` is an
    error (the file is then not written).
    """
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise UserError("ONNX export needs the optional packages: pip install 'unetrpp[export]'") from None
    from ..checkpoint import build_model, load_checkpoint
    from ..network import reference_math

    out = Path(out)
    if out.suffix != ".onnx":
        raise UserError(f"{out}: the output must end in .onnx")
    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt, source=str(checkpoint))
    if model.deep_supervision:
        model.deep_supervision = False
    cfg = model.config
    # trace with two samples: torch.export fixes a dimension whose example size is 1
    x = torch.randn(max(batch, 2), cfg.in_channels, *cfg.img_size, generator=torch.Generator().manual_seed(0))
    with atomic_path(out, suffix=".onnx") as tmp:
        # the reference op order: plain conv3d/linear ops that torch.export understands (same function)
        with torch.no_grad(), reference_math():
            program = torch.onnx.export(
                model, (x,), dynamo=True, opset_version=opset, input_names=["image"], output_names=["logits"],
                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}},
            )
            program.save(str(tmp))
        with torch.no_grad():
            expected = model(x).numpy()  # the fast path, as prediction runs it
        result = {"path": str(out), "patch_size": list(cfg.img_size), "in_channels": cfg.in_channels,
                  "classes": cfg.out_channels, "opset": opset}
        if check:
            import onnxruntime as ort

            sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
            diff = float(np.max(np.abs(got - expected)))
            result["max_abs_diff"] = diff
            if not diff <= atol:
                raise UserError(f"{out}: onnxruntime output differs from torch by {diff:.2e} (> {atol:g})")
    return result
