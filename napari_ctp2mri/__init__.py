"""napari plugin for ctp2mri: a thin Qt/napari layer over the core library."""

__version__ = "0.1.0"
