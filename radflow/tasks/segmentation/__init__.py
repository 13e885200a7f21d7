"""Segmentation task (3D, e.g. BraTS-like brain lesions): `task.Segmentation`.

Its network is ``radflow.models.unet``; here live its loss (``loss``), patch sampling and
loader (``patches``, ``augment``), sliding-window inference (``inference``), metrics
(``metrics``), evaluation and figures (``evaluation``, ``figures``) and synthetic cohort
(``synth``, ``brain_phantom``, ``ground_truth``)."""
