"""Segmentation task (3D, e.g. BraTS-like brain lesions): `task.Segmentation`.

Its network is ``radflow.models.unet``; here live its loss (``loss``), patch sampling and
loader (``patches``, ``augment``), sliding-window inference (``inference``), metrics
(``metrics``), evaluation and figures (``evaluation``, ``figures``) and the DICOM SEG of
its predictions (``dicom_seg``). Its synthetic demo cohort is ``radflow.synth.brain``."""
