"""The model and loader contracts of the training loop (train/contracts.py): the real classes and every
test double satisfy them, and a factory product that does not is refused once, naming what it lacks."""

import pytest

from train.contracts import Resumable, TrainableModel, TrainLoader, require


def test_real_model_and_loader_satisfy_the_contracts():
    from data.loader import EditLoader
    from moe.model import CareEditModel

    assert issubclass(CareEditModel, TrainableModel)
    assert issubclass(EditLoader, TrainLoader)


def test_test_doubles_satisfy_the_contracts():
    from tests.helpers.eval_toy import EvalToyModel
    from tests.helpers.faults import FaultyLoader
    from tests.helpers.toy_model import ToyEditModel, ToyLoader

    for model in (ToyEditModel, EvalToyModel):
        assert issubclass(model, TrainableModel), model
    for loader in (ToyLoader, FaultyLoader):
        assert issubclass(loader, TrainLoader), loader


def test_a_product_without_the_methods_is_refused_by_name():
    class Bare:
        def state_dict(self) -> dict:
            return {}

    with pytest.raises(TypeError, match=r"lacks __iter__, load_state_dict, skip_stats of TrainLoader"):
        require(Bare(), TrainLoader, "the loader factory's loader")
    with pytest.raises(TypeError, match=r"lacks load_state_dict of Resumable"):
        require(Bare(), Resumable, "the loader")
    with pytest.raises(TypeError, match=r"compile_regions, flops_per_token, routing_warnings"):
        require(Bare(), TrainableModel, "the model factory's model")
