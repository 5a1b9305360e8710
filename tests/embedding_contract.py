"""The contract every compression method passes; a method's test file subclasses it.

    class TestHashing(EmbeddingContract):
        def compression(self, spec):            # the method at a compressing setting
            return Hashing(rows=16)
        def uncompressed(self, spec):           # the method's no-compression setting, or None
            return Hashing(rows=spec.num_embeddings, identity=True)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import KeyedJaggedTensor

from recsys.embeddings.base import Compression
from recsys.embeddings.collection import CompressedEmbeddings, EmbeddingSettings
from recsys.embeddings.full import Full
from recsys.embeddings.spec import TableSpec, TableStats

N, D = 64, 8


def specs(pooling: str = "sum") -> list[TableSpec]:
    return [TableSpec("item", N, D, ("item", "neg_item"), pooling=pooling)]


def stats() -> dict[str, TableStats]:
    """Zipf-like counts (index 1 most frequent) and 8 clusters, for methods that use them."""
    counts = (1000 / np.arange(1, N + 1)).astype(np.int64)
    counts[0] = 0
    return {"item": TableStats(counts=counts, clusters=np.arange(N) % 8)}


def batch(seed: int = 0, batch_size: int = 6) -> KeyedJaggedTensor:
    """Bags of 0-4 ids (an empty bag included) over the two features."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 5, (2 * batch_size,), generator=g)
    lengths[1] = 0
    values = torch.randint(0, N, (int(lengths.sum()),), generator=g)
    return KeyedJaggedTensor.from_lengths_sync(["item", "neg_item"], values, lengths.int())


def build(compression: Compression, pooling: str = "sum", seed: int = 0) -> CompressedEmbeddings:
    torch.manual_seed(seed)
    return CompressedEmbeddings(specs(pooling), EmbeddingSettings(default=compression), stats())


def tensor_bytes_of(module: torch.nn.Module) -> int:
    total = 0
    for value in module.state_dict().values():
        tensors = [s.tensor for s in value.local_shards()] if isinstance(value, ShardedTensor) else [value]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


class EmbeddingContract:
    """Behaviour shared by every compression method."""

    def compression(self, spec: TableSpec) -> Compression:
        raise NotImplementedError

    def uncompressed(self, spec: TableSpec) -> Compression | None:
        return None

    def method(self, pooling: str = "sum", seed: int = 0) -> CompressedEmbeddings:
        return build(self.compression(specs(pooling)[0]), pooling, seed)

    @pytest.mark.parametrize("pooling", ["sum", "mean", "none"])
    def test_output_shapes(self, pooling):
        kjt = batch()
        out = self.method(pooling)(kjt)
        for feature in ("item", "neg_item"):
            if pooling == "none":
                assert out[feature].values().shape == (len(kjt[feature].values()), D)
                assert torch.equal(out[feature].lengths(), kjt[feature].lengths())
            else:
                assert out[feature].shape == (kjt.stride(), D)
        if pooling != "none":
            assert torch.count_nonzero(out["item"][1]) == 0  # the empty bag pools to zeros

    def test_pooled_equals_the_pooled_per_id_vectors(self):
        pooled, per_id = self.method("sum"), self.method("none")
        _copy_tables(pooled, per_id)
        kjt = batch(1)
        a, b = pooled(kjt), per_id(kjt)
        for feature in ("item", "neg_item"):
            lengths = kjt[feature].lengths()
            bag = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
            summed = torch.zeros(len(lengths), D).index_add_(0, bag, b[feature].values())
            torch.testing.assert_close(a[feature], summed, rtol=1e-5, atol=1e-6)

    def test_gradients_reach_every_trainable_tensor(self):
        emb = self.method("sum")
        out = emb(batch(2))
        (out["item"].pow(2).sum() + out["neg_item"].sum() + (emb.auxiliary_loss() or 0)).backward()
        for name, parameter in emb.named_parameters():
            if parameter.requires_grad:
                assert parameter.grad is not None and torch.count_nonzero(parameter.grad) > 0, name

    def test_same_ids_same_output_for_the_same_seed(self):
        kjt = batch(3)
        torch.testing.assert_close(self.method(seed=5)(kjt)["item"], self.method(seed=5)(kjt)["item"])

    def test_memory_accounting_equals_the_tensor_bytes(self):
        emb = self.method()
        assert sum(emb.memory().values()) == tensor_bytes_of(emb)

    @pytest.mark.parametrize("whole_tables", [True, False], ids=["rows_scored_once", "rows_gathered_per_chunk"])
    def test_items_score_from_the_stored_tables_as_the_decoded_vectors(self, whole_tables, monkeypatch):
        """Inner products from the stored form (``item_scores``) == queries . the vectors the collection looks up."""
        import recsys.embeddings.base

        monkeypatch.setattr(recsys.embeddings.base, "PRECOMPUTED_SCORES", 1 << 30 if whole_tables else 0)
        emb = self.method().eval()
        with torch.no_grad():
            for module in emb.lookups():  # rows of several magnitudes, so a wrong gather cannot hide
                for weight in module.state_dict().values():
                    weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(7)))
            ids = torch.arange(N)
            decoded = emb(KeyedJaggedTensor.from_lengths_sync(["item"], ids, torch.ones(N, dtype=torch.int32)))["item"]
            queries = torch.randn(3, D, generator=torch.Generator().manual_seed(8))
            chunks = list(emb.item_scores("item", queries, chunk=23))
        widths = [scores.shape[1] for _, scores in chunks]
        assert [start for start, _ in chunks] == [sum(widths[:i]) for i in range(len(chunks))]  # consecutive blocks
        got = torch.cat([scores for _, scores in chunks], dim=1)
        torch.testing.assert_close(got, queries @ decoded.T, rtol=1e-4, atol=1e-4)

    def test_vectors_of_single_ids_equal_the_lookup(self):
        """``vectors`` (decoded from the stored rows, no KeyedJaggedTensor) == the collection's forward of one-id bags."""
        emb = self.method().eval()
        ids = torch.tensor([0, 5, 1, N - 1, 5])
        with torch.no_grad():
            looked_up = emb(KeyedJaggedTensor.from_lengths_sync(["item"], ids, torch.ones(len(ids), dtype=torch.int32)))
        torch.testing.assert_close(emb.vectors("item", ids), looked_up["item"], rtol=1e-6, atol=1e-6)

    def test_no_compression_setting_reproduces_the_full_table(self):
        setting = self.uncompressed(specs()[0])
        if setting is None:
            pytest.skip("this method has no no-compression setting")
        full, same = build(Full()), build(setting)
        _copy_tables(full, same)
        kjt = batch(4)
        for feature in ("item", "neg_item"):
            torch.testing.assert_close(full(kjt)[feature], same(kjt)[feature])


def _copy_tables(source: CompressedEmbeddings, target: CompressedEmbeddings) -> None:
    """Copies plain-table rows by table name (pooled and per-id collections name them alike) and
    the methods' own parameters and buffers; where shapes differ (e.g. a no-compression setting
    with more rows), the source rows are copied into the leading rows of the target."""
    def tables(emb):
        found = {}
        for module in emb.lookups():
            for key, value in module.state_dict().items():
                found[key.split(".")[-2]] = value
        return found

    src, dst = tables(source), tables(target)
    for name, value in dst.items():
        match = src.get(name) if name in src else (next(iter(src.values())) if len(src) == 1 and len(dst) == 1 else None)
        if match is not None:
            rows = min(match.shape[0], value.shape[0])
            with torch.no_grad():
                value[:rows].copy_(match[:rows])
    target.methods.load_state_dict(source.methods.state_dict())


def mf_one_epoch(data, tmp_path, compression: Compression, dim: int, batch_size: int = 1024):
    """Trains MF one epoch with both tables compressed; returns (task, loss, full bytes per table)."""
    from recsys.training.loop import TrainerConfig
    from recsys.training.mf import MFRetrieval

    trainer = TrainerConfig(epochs=1, batch_size=batch_size, checkpoint_dir=str(tmp_path), progress=False)
    task = MFRetrieval(data, trainer, dim=dim, embedding=EmbeddingSettings(default=compression))
    loss = task.train_epoch(0, None)["loss"]
    return task, loss, {"user": data.n_users * dim * 4, "item": data.n_items * dim * 4}
