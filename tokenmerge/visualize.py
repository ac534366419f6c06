"""Which patches merged into which token, as arrays and pictures: the functions of
:mod:`tokenmerge.tools.visualize` at the path the documentation gives them."""
from .tools.visualize import (  # noqa: F401
    MergeGroups,
    Visualization,
    draw_figure,
    merge_groups,
    paint_groups,
    paint_merges,
    save_figure,
    visualize,
)

__all__ = ["MergeGroups", "Visualization", "draw_figure", "merge_groups", "paint_groups", "paint_merges",
           "save_figure", "visualize"]
