"""PVC (Periodic Visual Calibration): decoding that re-shows the image at reflection points."""

from tvc_lightning.pvc.config import PVCConfig
from tvc_lightning.pvc.decode import pvc_generate
from tvc_lightning.pvc.results import Calibration, PVCResult

__all__ = ["Calibration", "PVCConfig", "PVCResult", "pvc_generate"]
