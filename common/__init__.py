"""Small utilities shared by models/, data/, callbacks/ and recipes/: strict config loading, atomic file output."""
