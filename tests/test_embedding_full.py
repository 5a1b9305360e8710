import pytest
import torch

from recsys.embeddings.collection import CompressedEmbeddings, EmbeddingSettings
from recsys.embeddings.full import Full
from recsys.embeddings.spec import TableSpec
from recsys.errors import ConfigError
from tests.embedding_contract import EmbeddingContract, batch, build


class TestFull(EmbeddingContract):
    def compression(self, spec):
        return Full()

    def uncompressed(self, spec):
        return Full()


def test_full_lookup_is_the_row_sum():
    emb = build(Full())
    kjt = batch()
    weight = emb.bags.embedding_bags["item__full"].weight
    lengths, values = kjt["item"].lengths(), kjt["item"].values()
    start = 0
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(emb(kjt)["item"][b], weight[values[start:start + n]].sum(0))
        start += n


def test_collection_rejects_bad_specs():
    with pytest.raises(ConfigError, match="duplicate table name 'a'"):
        CompressedEmbeddings([TableSpec("a", 4, 2, ("x",)), TableSpec("a", 4, 2, ("y",))])
    with pytest.raises(ConfigError, match="read by more than one table"):
        CompressedEmbeddings([TableSpec("a", 4, 2, ("x",)), TableSpec("b", 4, 2, ("x",))])
    with pytest.raises(ConfigError, match=r"embedding.tables names unknown tables \['c'\]"):
        CompressedEmbeddings([TableSpec("a", 4, 2, ("x",))], EmbeddingSettings(tables={"c": Full()}))
    with pytest.raises(ConfigError, match="pooling must be sum, mean or none"):
        TableSpec("a", 4, 2, ("x",), pooling="max")
