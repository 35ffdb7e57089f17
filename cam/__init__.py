"""Class activation maps: figures (`export`, `mixed`) and localisation numbers (`localize`).

`cam.methods` holds the CAM-method registry (plain CAM computed here, Grad-CAM and its peers
through the grad-cam package); `cam.render` the RGB overlays and figure grids;
`cam.localize` the WSOL metrics.
"""

from cam.methods import (CamMethod, CamResult, build_cam, get_cam_method, list_cam_methods,
                         register_cam)

__all__ = ["CamMethod", "CamResult", "build_cam", "get_cam_method", "list_cam_methods",
           "register_cam"]
