"""Binary networks: XNOR-Net binarization of any model's convolutions (``binarize``), one concept per file.

* ``ste.py``: ``binary_sign``, the sign with ``sign(0) = +1`` and the clipped straight-through gradient;
* ``conv.py``: ``BinaryConv2d``, a binary convolution (input BN, sign, binary weights with per-filter scale)
  around an existing ``nn.Conv2d``, which counts its binary operations for ``compconv.profile``;
* ``transform.py``: ``binarize(model)`` (walks into compact convs, keeps stem / classifier / ``keep``) and
  ``apply_binarization`` / ``binary_spec`` (what ``compconv.save`` / ``load`` record and rebuild);
* ``report.py``: the per-layer ``BinarizationReport``.

See docs/binarize.md for which parts stay real-valued and how binary networks are counted.
"""

from compconv.binary.conv import BinaryConv2d
from compconv.binary.report import BinarizationReport, LayerBinarization
from compconv.binary.ste import binary_sign
from compconv.binary.transform import apply_binarization, binarize, binary_layers, binary_spec

__all__ = [
    "BinarizationReport",
    "BinaryConv2d",
    "LayerBinarization",
    "apply_binarization",
    "binarize",
    "binary_layers",
    "binary_sign",
    "binary_spec",
]
