"""The segmentation task: 3D lesion segmentation of multi-channel brain MR."""
