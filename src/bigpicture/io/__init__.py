"""Sources and sinks: lazy inputs read region by region, outputs written region by region.

A source has ``shape`` ``(N, C, *spatial)``, ``dtype`` and ``__getitem__(slices)``
returning that region as numpy; the engine reads each tile's read box from it.
Optional libraries (openslide, tifffile, zarr, nibabel, pydicom) are imported
only when a function that needs them is called.
"""

from bigpicture.io.pyramid import mosaic_slide, write_pyramid
from bigpicture.io.sinks import ZarrSink
from bigpicture.io.slides import open_slide
from bigpicture.io.sources import Source, as_source
from bigpicture.io.volumes import open_volume

__all__ = ["Source", "ZarrSink", "as_source", "mosaic_slide", "open_slide", "open_volume", "write_pyramid"]
