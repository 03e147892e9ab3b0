"""Volumes and label maps with their geometry: the Volume/LabelMap/Segment types, reading and writing
NIfTI, NRRD, MetaImage, DICOM and Slicer .seg.nrrd files, slicing geometry (which array axis is
axial), intensity normalisation, and the example data download. Imports only ``common``; numpy and
SimpleITK (lazily), never torch.
"""
