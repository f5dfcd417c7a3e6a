"""A model split across processes: split plans and pipeline-parallel inference."""
