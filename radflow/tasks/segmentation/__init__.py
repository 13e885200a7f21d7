"""Segmentation task (3D, e.g. BraTS-like brain lesions): its network is
``radflow.models.unet``; its loss (``loss``), patch sampling and loader (``patches``,
``augment``) and sliding-window inference (``inference``) live here; the Task class
will live here too."""
