"""Installed as ``hydra_plugins.lmtk_launchers``: Hydra takes launchers from that namespace only.

The behaviour lives in ``lmtk.launchers``; without the ``slurm`` extra there is nothing to offer, and
Hydra's plugin scan finds nothing here.
"""

try:
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher
except ImportError:
    pass
else:
    from lmtk.launchers import Accounted, SlurmRequestCheck

    class ConvertSlurmLauncher(SlurmRequestCheck, SlurmLauncher):
        """``hydra/launcher=convert_slurm``."""

    class ConvertLocalLauncher(Accounted, LocalLauncher):
        """``hydra/launcher=convert_local``."""
