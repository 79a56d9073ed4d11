"""Bad input gets a clear error naming the problem, never a silent wrong result."""

import pytest
import torch

from memsparse import MSAConfig

from ..conftest import make_sample, tiny_model


@pytest.fixture
def model():
    return tiny_model("qwen3", msa={"pooling_kernel_size": 4, "top_k_docs": 2})


def test_mismatched_shapes(model):
    ids, doc = make_sample([4, 4])
    with pytest.raises(ValueError, match="doc_ids shape"):
        model(ids[None], doc[None, :-1])
    with pytest.raises(ValueError, match="labels shape"):
        model(ids[None], doc[None], labels=ids[None, :-1])
    with pytest.raises(ValueError, match="input_ids must be"):
        model(ids, doc)
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(ids[None], doc[None], attention_mask=torch.ones(1, 3))


def test_document_not_contiguous(model):
    ids, doc = make_sample([4, 4])
    doc[5] = 2  # a token of document 2 inside document 1, which then continues
    with pytest.raises(ValueError, match="document 1 of sample 0 is not a contiguous run"):
        model(ids[None], doc[None])


def test_sample_without_routing_tokens(model):
    ids, doc = make_sample([4, 4], n_query=0)
    with pytest.raises(ValueError, match="no routing-query tokens"):
        model(ids[None], doc[None])


def test_labels_on_documents(model):
    ids, doc = make_sample([4, 4])
    with pytest.raises(ValueError, match="labels set on document tokens"):
        model(ids[None], doc[None], labels=ids[None])


def test_aux_labels_too_narrow(model):
    ids, doc = make_sample([4, 4, 3])
    with pytest.raises(ValueError, match="aux_labels shape"):
        model(ids[None], doc[None], aux_labels=torch.tensor([[1, 0]]))


@pytest.mark.parametrize("key,value,match", [
    ("head_reduce_method", "median", "head_reduce_method='median' is not supported"),
    ("query_reduce_method", "first", "query_reduce_method"),
    ("chunk_reduce_method", "min", "chunk_reduce_method"),
    ("aux_loss_method", "CONTRASTIVE", "aux_loss_method"),
    ("top_k_docs", 0, "top_k_docs must be a positive integer"),
    ("pooling_kernel_size", "64", "pooling_kernel_size must be a positive integer"),
    ("decouple_router", "yes", "decouple_router='yes' is not a boolean"),
    ("infonce_loss_temp", -1, "infonce_loss_temp must be positive"),
])
def test_unknown_msa_config_values(key, value, match):
    with pytest.raises(ValueError, match=match):
        MSAConfig.from_dict({key: value})


def test_router_layer_out_of_range():
    with pytest.raises(ValueError, match=r"layers \[40\] outside 0..3"):
        tiny_model(msa={"router_layer_idx": "2,40"})


def test_fuse_layers_are_router_layers():
    cfg = MSAConfig.from_dict({"router_layer_idx": "4,5,6,7"})
    assert cfg.fuse_layers(8) == [4, 5, 6, 7] and "fuse_layer_idx" not in cfg.to_dict(8)  # absent: all of them
    cfg = MSAConfig.from_dict({"router_layer_idx": "4,5,6,7", "fuse_layer_idx": "7, 6"})
    assert cfg.fuse_layers(8) == [6, 7] and cfg.to_dict(8)["fuse_layer_idx"] == "6,7"
    assert MSAConfig.from_dict(cfg.to_dict(8)).fuse_layers(8) == [6, 7]
    with pytest.raises(ValueError, match=r"fuse_layer_idx has layers \[3\] outside the router layers \[4, 5, 6, 7\]"):
        MSAConfig.from_dict({"router_layer_idx": "4,5,6,7", "fuse_layer_idx": "3,4"}).fuse_layers(8)
    with pytest.raises(ValueError, match="fuse_layer_idx selects no layer"):
        MSAConfig.from_dict({"router_layer_idx": "4,5", "fuse_layer_idx": ","}).fuse_layers(8)


def test_unknown_msa_keys_warn_but_official_extras_do_not():
    with pytest.warns(UserWarning, match="unknown keys"):
        MSAConfig.from_dict({"top_k_doc": 4})
    MSAConfig.from_dict({"recloss_weight": 0.0, "rewrite_position": True})  # official keys we keep


def test_aux_labels_with_aux_loss_disabled():
    model = tiny_model(msa={"pooling_kernel_size": 4, "aux_loss": False})
    ids, doc = make_sample([4, 4])
    with pytest.raises(ValueError, match="aux_loss is false"):
        model(ids[None], doc[None], aux_labels=torch.tensor([[1, 0]]))
