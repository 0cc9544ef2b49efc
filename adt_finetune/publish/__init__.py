"""Publishing results as the field does: a static HTML leaderboard (`build_site`) and a
RobustBench submission (`export_robustbench`: model_info JSON, checkpoint, zoo registration)."""
from .export import Export, export_robustbench
from .site import Site, build_site

__all__ = ["Export", "Site", "build_site", "export_robustbench"]
