"""Localisation task (3D lesion centres, e.g. lung nodules on CT): `task.Localization`.

Its network is ``radflow.models.unet`` with five outputs per voxel; here live the
centre-heatmap targets, loss and decoding (``centres``), the evaluation by LUNA16's
FROC (``evaluation``, scored by ``radflow.luna16``) and figures (``figures``). Its
synthetic demo cohort is ``radflow.synth.chest``."""
