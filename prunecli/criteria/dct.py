"""DCTPruning: energy of each channel's feature maps in the DCT domain.

Chen, Zhou, Guo, Shen, Wang, Wen, Suo, "Discrete cosine transform for filter pruning", Applied
Intelligence 53, 2023, doi 10.1007/s10489-022-03604-2 (code: semchan/DCT_Pruning,
``utils/common.py::get_feature_hook``). docs/methods.md section 2.

[CODE]-confirmed: the hook sits on the channels as the next layer receives them (after BN, ReLU and, in
residual blocks, the add); each map goes through the orthonormal 2-D DCT-II; the score is the sum of the
squared coefficients over the *whole* spectrum, averaged over the calibration images; the highest scores
are kept. By Parseval's identity that is the map's sum of squares, which is how ``dct_band="full"``
(the default) computes it.

[INFERRED]: ``dct_band="low"`` scores the energy of the low-frequency ceil(H/4) x ceil(W/4) block only,
following the paper's "important information lies in low frequencies" motivation (by analogy with
LRMF); it is not in the released code.

Options:
    dct_band: "full" (default, the authors' code) or "low" ([INFERRED] low-frequency block energy).

Departures: one shared calibration pass instead of re-drawn augmented batches per layer; channels of
a residual group are scored together (see ``criteria.base``) instead of independently per block.
"""

from __future__ import annotations

from torch import Tensor

from prunecli.criteria import register_criterion
from prunecli.criteria.base import Criterion
from prunecli.criteria.dctbasis import as_maps, dct2, low_block
from prunecli.errors import PrunecliError

BANDS = ("full", "low")


def dct_energy(features: Tensor, band: str = "full") -> Tensor:
    """[B, n, H, W] -> [n]: DCT-domain energy per channel, summed over the images."""
    maps = as_maps(features)
    if band == "full":  # Parseval: the orthonormal DCT preserves the sum of squares
        return maps.pow(2).sum((2, 3)).double().sum(0)
    coefficients = dct2(maps, *low_block(*maps.shape[-2:]))
    return coefficients.pow(2).sum((2, 3)).double().sum(0)


@register_criterion
class DCTEnergy(Criterion):
    name = "dct"
    paper = "Chen et al., Discrete cosine transform for filter pruning, Applied Intelligence 2023"
    summary = "DCT energy of the channel's activations (dct_band=full: the authors' code; low: [INFERRED])"
    needs_data = True
    hook = "activation"

    def __init__(self, seed: int = 0, **options):
        super().__init__(seed, **options)
        self.band = str(self.options.get("dct_band", "full"))
        if self.band not in BANDS:
            raise PrunecliError(f"dct_band must be one of {', '.join(BANDS)}, got {self.band!r}")

    def feature_statistic(self, features: Tensor) -> Tensor:
        return dct_energy(features, self.band)
