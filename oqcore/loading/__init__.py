"""Loading: building models from a checkpoint folder without reading weights, and (online) loading."""

from oqcore.loading.meta import build_meta_model, bundled_model_dir, read_model_config

__all__ = ["build_meta_model", "bundled_model_dir", "read_model_config"]
