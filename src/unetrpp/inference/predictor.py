"""Whole-case prediction from a checkpoint: preprocess like training, slide, undo, keep the geometry."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import Checkpoint, build_model
from ..data.plans import Plans
from ..data.preprocess import preprocess_array
from ..data.restore import CaseProperties
from ..errors import UserError
from ..io import Geometry, read_case
from ..runtime import resolve_amp, resolve_device
from .sliding_window import DEFAULT_SHORTCUTS, DEFAULT_STEP, MIRROR_AXES, Shortcuts, sliding_window_probabilities


@dataclass
class Prediction:
    """A label map on the input's grid, its geometry and, if asked for, the class probabilities."""

    label: np.ndarray  # (z, y, x), uint8 (int16 beyond 255 classes)
    geometry: Geometry
    probabilities: np.ndarray | None = None  # (k, z, y, x) float32 on the input's grid


class Predictor:
    """Segments volumes with a trained network; needs only the checkpoint.

    Examples:
        >>> from unetrpp.inference import Predictor                    # doctest: +SKIP
        >>> pred = Predictor.from_checkpoint("run/checkpoint_final.pt")  # doctest: +SKIP
        >>> result = pred.predict("ct.nii.gz")                         # doctest: +SKIP
        >>> result.label.shape, result.geometry.spacing_zyx            # doctest: +SKIP
    """

    def __init__(
        self,
        model: torch.nn.Module,
        plans: Plans | dict,
        labels: dict[str, int] | None = None,
        device: str | torch.device | None = "auto",
        step: float = DEFAULT_STEP,
        tta: bool = True,
        batch: int | None = None,
        amp: str | None = "auto",
        progress: bool = False,
        shortcuts: Shortcuts = DEFAULT_SHORTCUTS,
        postprocessing: dict | None = None,
    ):
        """``shortcuts``: work the sliding window may skip (``sliding_window.EXACT``: none, the official protocol).
        ``postprocessing``: what ``find-best`` chose (:mod:`unetrpp.inference.postprocess`), applied to the labels."""
        self.device = resolve_device(device)
        self.amp = resolve_amp(amp, self.device)
        self.model = model.to(self.device).eval()
        self.plans = Plans.coerce(plans)
        self.labels = labels or self.plans.labels
        self.step = float(step)
        self.tta = tta
        #: network passes per forward call (None: the driver plans it, see ``sliding_window_probabilities``)
        self.batch = batch
        self.progress = progress
        self.shortcuts = shortcuts
        self.stats: dict = {}  # the last case's window counts (sliding_window_probabilities)
        self.patch_size = tuple(int(p) for p in model.config.img_size)
        self.num_classes = int(model.config.out_channels)
        self.num_channels = int(model.config.in_channels)
        #: ``(network, plans)`` of every member; their softmax outputs are averaged
        self.members: list[tuple[torch.nn.Module, Plans]] = [(self.model, self.plans)]
        self.postprocessing = postprocessing

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = "auto",
                        **kwargs) -> Predictor:
        ckpt = Checkpoint.load(path)
        return cls(build_model(ckpt), ckpt.read_plans(), ckpt.labels, device=device, **kwargs)

    @classmethod
    def from_model(cls, model, device: str | torch.device | None = "auto", **kwargs) -> Predictor:
        """A predictor for a :class:`~unetrpp.inference.model.Model` (one network or an ensemble, with its
        postprocessing), or for whatever :func:`~unetrpp.inference.model.load_model` reads from a path."""
        from .model import Model, load_model

        if not isinstance(model, Model):
            model = load_model(model)
        first = model.members[0]
        kwargs.setdefault("postprocessing", model.postprocessing)
        pred = cls(first.network, first.plans, model.labels, device=device, **kwargs)
        pred.members = [(m.network.to(pred.device).eval(), m.plans) for m in model.members]
        return pred

    # ------------------------------------------------------------------ core
    def probabilities_preprocessed(self, data: np.ndarray | torch.Tensor, networks=None) -> torch.Tensor:
        """Softmax ``(k, z, y, x)`` of a preprocessed ``(c, z, y, x)`` case (float32, on the accumulation device),
        averaged over ``networks`` (default: this predictor's first network)."""
        if data.shape[0] != self.num_channels:
            raise UserError(f"the network takes {self.num_channels} channel(s), the image has {data.shape[0]}")
        x = torch.from_numpy(np.array(data, dtype=np.float32))
        total = None
        networks = [self.model] if networks is None else list(networks)
        for net in networks:
            probs = self._slide(net, x)
            total = probs if total is None else total.add_(probs)
        return total if len(networks) == 1 else total.div_(len(networks))

    def _slide(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        def forward(t: torch.Tensor) -> torch.Tensor:
            out = net(t)
            return out[0] if isinstance(out, (list, tuple)) else out

        ds = getattr(net, "deep_supervision", False)
        if ds:
            net.deep_supervision = False
        try:
            return sliding_window_probabilities(
                forward, x, tuple(int(p) for p in net.config.img_size), self.num_classes, step=self.step,
                mirror_axes=MIRROR_AXES if self.tta else (), batch=self.batch, device=self.device, amp=self.amp,
                progress=self.progress, shortcuts=self.shortcuts, stats=self.stats,
            )
        finally:
            if ds:
                net.deep_supervision = True

    def predict_preprocessed(self, data: np.ndarray, props: CaseProperties | dict,
                             return_probabilities: bool = False) -> Prediction:
        """Predict a case already preprocessed (``props`` as preprocessing made it) onto its original grid."""
        probs = self.probabilities_preprocessed(data)
        return self._finish(probs, CaseProperties.coerce(props), return_probabilities)

    def _finish(self, probs: torch.Tensor, props: CaseProperties, return_probabilities: bool) -> Prediction:
        label = props.restore_label_from_probabilities(probs)
        full = props.restore_probabilities(probs.cpu().numpy()) if return_probabilities else None
        return Prediction(self._postprocess(label), props.original_geometry(), full)

    def _postprocess(self, label: np.ndarray) -> np.ndarray:
        if not self.postprocessing:
            return label
        from .postprocess import apply_postprocessing

        return apply_postprocessing(label, self.postprocessing)

    def predict(
        self,
        image: str | os.PathLike | Sequence[str | os.PathLike] | np.ndarray,
        spacing: Sequence[float] | None = None,
        geometry: Geometry | None = None,
        return_probabilities: bool = False,
    ) -> Prediction:
        """Segment a file, a DICOM folder, a list of channel files, or an array.

        Args:
            image: a path, a list of channel paths, or an array ``(z, y, x)`` / ``(c, z, y, x)``.
            spacing: voxel spacing (z, y, x) in mm of an array input (or give ``geometry``).
            geometry: full geometry of an array input.
        """
        if isinstance(image, np.ndarray):
            if geometry is None:
                if spacing is None:
                    raise UserError("an array input needs its voxel spacing (spacing=(z, y, x) in mm) or geometry")
                geometry = Geometry.identity(spacing)
            data = image[None] if image.ndim == 3 else image
        else:
            paths = [image] if isinstance(image, (str, os.PathLike)) else list(image)
            data, geometry = read_case([Path(p) for p in paths])
        if data.shape[0] != self.num_channels:
            raise UserError(f"the network takes {self.num_channels} channel(s), the input has {data.shape[0]}")
        groups: dict[str, list] = {}
        for net, plans in self.members:  # members that preprocess alike share one preprocessed volume
            groups.setdefault(plans.id, [plans]).append(net)
        if len(groups) == 1:
            plans, *nets = next(iter(groups.values()))
            pre, _, props = preprocess_array(data, geometry, plans)
            return self._finish(self.probabilities_preprocessed(pre, nets), props, return_probabilities)
        # members trained at different spacings: average on the input's grid
        total = props = None
        for plans, *nets in groups.values():
            pre, _, props = preprocess_array(data, geometry, plans)
            full = props.restore_probabilities(self.probabilities_preprocessed(pre, nets).cpu().numpy())
            full *= len(nets) / len(self.members)
            total = full if total is None else np.add(total, full, out=total)
        label = total.argmax(0).astype(np.uint8 if total.shape[0] <= 256 else np.int16)
        return Prediction(self._postprocess(label), props.original_geometry(), total if return_probabilities else None)
