"""Segmentation task (3D, e.g. BraTS brain-tumour regions): its metrics live in
``radflow.tasks.segmentation.metrics``; the Task class will live here."""
