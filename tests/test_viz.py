"""Overlay colours: one per label, none grey (grey vanishes on CT), label 11 not label 1's."""

import numpy as np

from unetrpp.viz import colours


def test_label_colours_are_distinct_and_never_grey():
    cols = colours(19)  # background + 18 labels
    assert cols.shape == (19, 3) and tuple(cols[0]) == (0, 0, 0)
    labels = [tuple(np.round(c, 6)) for c in cols[1:]]
    assert len(set(labels)) == 18
    assert all(max(c) - min(c) > 0.1 for c in cols[1:])  # saturation: not a grey
    assert tuple(cols[1]) != tuple(cols[11])  # BTCV spleen (1) and pancreas (11) differ
