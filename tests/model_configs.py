"""Kept only for bench/check_compiled.py, which imports ``tests.model_configs``: the tiny model config and
batches live in tests/helpers/model_configs.py. Delete this file once bench/ imports from there."""

from tests.helpers.model_configs import TINY, data_dependent_nodes, make_batch, tiny_model_config

__all__ = ["TINY", "data_dependent_nodes", "make_batch", "tiny_model_config"]
