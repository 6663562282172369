"""Config sections: the shared run keys, plus the task's own section alone."""

import pytest

from vqvae.distributed import STEP_TIMEOUT_S

TOKENIZER_ONLY = {"loss", "gan", "kmeans_init", "dead_code_report_threshold"}


def test_a_generator_config_carries_no_tokenizer_keys():
    from configs import prior_default

    c = prior_default.get_config()
    assert c.task == "prior" and not TOKENIZER_ONLY & set(c.keys())


@pytest.mark.parametrize("name", ["tiny", "default", "cifar10", "imagenet_vq16"])
def test_a_tokenizer_config_has_its_section_and_the_shared_keys(name):
    import importlib

    c = importlib.import_module(f"configs.{name}").get_config()
    assert c.task == "tokenizer" and set(c.keys()) >= TOKENIZER_ONLY
    assert c.step_timeout_s == STEP_TIMEOUT_S  # one default, also the code's
