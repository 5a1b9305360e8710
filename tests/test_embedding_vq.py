import math

import pytest
import torch
from torchrec import KeyedJaggedTensor

from recsys.embeddings.base import Compression
from recsys.embeddings.collection import CompressedEmbeddings, EmbeddingSettings
from recsys.embeddings.full import Full, FullTable
from recsys.embeddings.quantization import (DifferentiableVQ, ProductQuantization, code_dtype, fit_product_quantizer,
                                            plan_codebooks, pq_bytes, reconstruct)
from recsys.embeddings.spec import TableSpec
from recsys.errors import ConfigError
from tests.distributed import run_ranks
from tests.embedding_contract import D, N, EmbeddingContract, batch, build, specs


class TestProductQuantization(EmbeddingContract):
    """Random codes (the from-scratch baseline): S=2 codebooks of 16 codewords."""

    def compression(self, spec):
        return ProductQuantization(subspaces=2, codewords=16)

    # No uncompressed(): the exact limit (S=1, K=N, identity codes) keeps a codes buffer that the
    # contract's copy from a Full table cannot fill; test_k_at_least_n_distinct_rows_is_exact covers it.


class TestDifferentiableVQ(EmbeddingContract):
    def compression(self, spec):
        return DifferentiableVQ(subspaces=2, codewords=8, reseed_every=3)


def every_id(n: int = N) -> KeyedJaggedTensor:
    """One bag per id 0..n-1 of feature ``item``."""
    return KeyedJaggedTensor.from_lengths_sync(["item"], torch.arange(n), torch.ones(n, dtype=torch.int32))


def low_rank(n: int = 1000, dim: int = 16, rank: int = 4, noise: float = 0.05, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(n, rank, generator=g) @ torch.randn(rank, dim, generator=g)
    return signal + noise * torch.randn(n, dim, generator=g)


def test_codes_use_the_narrowest_integer_dtype():
    assert [code_dtype(k) for k in (2, 256, 257, 32768, 32769)] == [torch.uint8, torch.uint8, torch.int16,
                                                                     torch.int16, torch.int32]
    spec = TableSpec("item", 100, 8, ("item",))
    for k, dtype in ((256, torch.uint8), (300, torch.int16), (40000, torch.int32)):
        method = ProductQuantization(subspaces=2, codewords=k).build(spec)
        assert method.codes.dtype == dtype and method.codes.shape == (100, 2)
        assert method.transform(torch.tensor([3]))[0].dtype == torch.int64
    codes, _ = fit_product_quantizer(torch.randn(300, 8), 2, 300)
    assert codes.dtype == torch.int16


def test_random_codes_are_seeded_and_cover_the_codewords():
    spec = TableSpec("item", 2000, 8, ("item",))
    a, b = ProductQuantization(codewords=16, seed=1).build(spec), ProductQuantization(codewords=16, seed=1).build(spec)
    assert torch.equal(a.codes, b.codes)
    assert not torch.equal(a.codes, ProductQuantization(codewords=16, seed=2).build(spec).codes)
    assert set(a.codes.unique().tolist()) == set(range(16))


def test_reconstruction_error_falls_as_codewords_grow():
    weights = low_rank()
    errors = []
    for k in (4, 16, 64):
        codes, books = fit_product_quantizer(weights, subspaces=4, codewords=k, seed=0)
        assert books.shape == (4, k, 4)
        errors.append(float((reconstruct(codes, books) - weights).pow(2).sum(1).mean()))
    assert errors[0] > errors[1] > errors[2] > 0, errors
    assert errors[2] < 0.5 * errors[0]


def test_pq_from_a_trained_full_table_reproduces_the_quantized_vectors():
    full = build(Full())
    optimizer = torch.optim.SGD(full.parameters(), lr=0.5)
    for step in range(3):  # a few steps, so the table is "trained" rather than at its init
        out = full(batch(step))
        (out["item"] - 1).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        weights = full(every_id())["item"]  # what MFRetrieval.embed returns for every id
    pq = ProductQuantization.from_table(weights, subspaces=4, codewords=8, seed=0)
    assert pq.source == "kmeans" and pq.codes.dtype == torch.uint8
    quantized = reconstruct(pq.codes, pq.codebooks)
    emb = build(pq)
    torch.testing.assert_close(emb(every_id())["item"], quantized, rtol=0, atol=0)
    kjt = batch(7)  # pooled bags are sums of the quantized rows
    lengths, values = kjt["item"].lengths(), kjt["item"].values()
    bag = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    expected = torch.zeros(len(lengths), D).index_add_(0, bag, quantized[values])
    torch.testing.assert_close(emb(kjt)["item"], expected)
    assert emb.memory()["item"] == pq_bytes(N, D, 4, 8) == N * 4 + 8 * D * 4


def test_k_at_least_n_distinct_rows_is_exact():
    full = build(Full())
    with torch.no_grad():
        weights = full(every_id())["item"]
    pq = ProductQuantization.from_table(weights, subspaces=1, codewords=N)
    same = build(pq)
    kjt = batch(4)
    for feature in ("item", "neg_item"):
        torch.testing.assert_close(same(kjt)[feature], full(kjt)[feature])
    codes, books = fit_product_quantizer(weights, subspaces=2, codewords=N + 10)  # more codewords than rows
    torch.testing.assert_close(reconstruct(codes, books), weights, rtol=0, atol=0)


def test_pq_codebooks_keep_training():
    emb = build(ProductQuantization.from_table(low_rank(N, D), subspaces=2, codewords=8))
    before = [p.detach().clone() for p in emb.parameters()]
    emb(batch())["item"].sum().backward()
    torch.optim.SGD(emb.parameters(), lr=0.1).step()
    assert any(not torch.equal(a, b) for a, b in zip(before, emb.parameters()))


def _toy_vq(**kwargs):
    torch.manual_seed(0)
    settings = dict(subspaces=2, codewords=8, reseed_every=0, seed=0) | kwargs
    return CompressedEmbeddings(specs(), EmbeddingSettings(default=DifferentiableVQ(**settings)))


def test_vq_auxiliary_loss_is_positive_and_falls_during_training():
    emb = _toy_vq()
    optimizer = torch.optim.Adam(emb.parameters(), lr=0.01)
    losses = []
    for step in range(15):  # the codebook and commitment losses alone pull queries and codewords together
        emb(every_id())
        auxiliary = emb.auxiliary_loss()
        losses.append(auxiliary.item())
        auxiliary.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(loss > 0 for loss in losses)
    assert losses[-1] < 0.25 * losses[0], losses
    with torch.no_grad():
        emb(every_id())
    assert emb.auxiliary_loss() is None  # no-grad forwards add no loss


def test_vq_straight_through_gradient_fits_a_quantizable_target():
    g = torch.Generator().manual_seed(1)
    targets = reconstruct(torch.randint(0, 8, (N, 2), generator=g), 0.1 * torch.randn(2, 8, D // 2, generator=g))
    emb = _toy_vq()
    optimizer = torch.optim.Adam(emb.parameters(), lr=0.01)
    errors = []
    for step in range(20):
        error = (emb(every_id())["item"] - targets).pow(2).sum(1).mean()
        errors.append(error.item())
        (error + emb.auxiliary_loss()).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert errors[-1] < 0.4 * errors[0], errors


def test_vq_outputs_are_codewords_and_export_reproduces_them():
    emb = _toy_vq(reseed_every=2)
    optimizer = torch.optim.Adam(emb.parameters(), lr=0.01)
    for step in range(5):
        out = emb(batch(step))
        (out["item"].sum() + emb.auxiliary_loss()).backward()
        optimizer.step()
        optimizer.zero_grad()
    emb.eval()
    method = emb.methods["item"]
    with torch.no_grad():
        outputs = emb(every_id())["item"]
        query = emb.plain_weight("item__query").detach().clone()
    from_outputs, from_query = method.export(outputs), method.export(query)
    assert torch.equal(from_outputs.codes, from_query.codes) and from_outputs.source == "vq"
    assert from_outputs.codes.dtype == torch.uint8
    torch.testing.assert_close(reconstruct(from_query.codes, from_query.codebooks), outputs, rtol=0, atol=0)
    exported = build(from_query)
    kjt = batch(9)
    for feature in ("item", "neg_item"):
        torch.testing.assert_close(exported(kjt)[feature], emb(kjt)[feature])
    assert sum(exported.memory().values()) == pq_bytes(N, D, 2, 8) < sum(emb.memory().values())
    usage = method.codebook_usage(outputs)
    assert 0 < usage["used_fraction"] <= 1 and 1 <= usage["perplexity"] <= 8


def test_a_collection_is_served_as_codes_and_codebooks_that_reload_from_the_stored_config():
    """``served_form``: the VQ table becomes PQ codes + codebooks, the full table stays; the stored settings build a
    collection that loads the served state and looks up what the trained collection does."""
    from recsys.embeddings.collection import served_form
    from recsys.inference.package import from_config, to_config

    tables = [TableSpec("user", 30, D, ("user",)), TableSpec("item", N, D, ("item", "neg_item"))]
    settings = EmbeddingSettings(Full(), {"item": DifferentiableVQ(subspaces=2, codewords=8)})
    trained = CompressedEmbeddings(tables, settings)
    trained(batch(0))["item"].sum().backward()  # the first training forward seeds the codebooks
    trained.eval()
    served, state = served_form(trained, settings, {f"m.{k}": v for k, v in trained.state_dict().items()}, "m.")
    assert not [k for k in state if "item__query" in k or "methods.item.usage" in k]
    assert [k for k in state if "user__" in k] == [k for k in (f"m.{k}" for k in trained.state_dict()) if "user__" in k]
    stored = from_config(to_config(served))  # through the package's JSON
    assert stored.tables["item"] == ProductQuantization(subspaces=2, codewords=8, source="stored")
    reloaded = CompressedEmbeddings(tables, stored)
    reloaded.load_state_dict({k[2:]: v for k, v in state.items()})
    kjt = KeyedJaggedTensor.from_lengths_sync(["user", "item"], torch.tensor([1, 2, 3, 4, 5, 6]),
                                              torch.tensor([1, 2, 2, 1], dtype=torch.int32))
    for feature, vectors in trained(kjt).items():
        torch.testing.assert_close(reloaded(kjt)[feature], vectors, rtol=0, atol=0)
    assert reloaded.memory() == {"user": 30 * D * 4, "item": pq_bytes(N, D, 2, 8)}


def test_dead_codes_are_reseeded_from_query_vectors():
    emb = _toy_vq(reseed_every=2, codewords=8)
    method = emb.methods["item"]
    emb(every_id())  # forward 1 seeds every codeword from the batch's query vectors
    query = emb.plain_weight("item__query").detach()
    with torch.no_grad():
        method.codebooks[0, 5:] = 100.0  # far from every query: unused from now on
        method.usage.zero_()
    kept = method.codebooks.detach().clone()
    emb(every_id())  # forward 2 counts usage
    usage = method.codebook_usage()
    assert usage["used_fraction"] <= 1 - 3 / 16
    assert torch.all(method.usage[0, 5:] == 0) and method.usage.sum() == 2 * N
    emb(every_id())  # forward 3 starts a new window: dead codewords move onto query vectors
    books = method.codebooks.detach()
    assert torch.all(books[0, 5:] != 100.0)
    candidates = query[:, :D // 2]
    for row in books[0, 5:]:
        assert (candidates - row).abs().sum(1).min() == 0
    used = method.window_usage >= 1
    assert torch.equal(books[used], kept[used])  # codewords in use stay where they were
    assert method.window_usage[0, 5:].sum() == 0
    with torch.no_grad():  # an explicit check: only codewords below dead_code_threshold move
        method.usage.fill_(5)
        method.usage[1, 0] = 0
    before = method.codebooks.detach().clone()
    assert method.reseed_dead_codes(query) == 1
    after = method.codebooks.detach()
    assert (query[:, D // 2:] - after[1, 0]).abs().sum(1).min() == 0
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 0] = False
    assert torch.equal(after[mask], before[mask])
    assert method.usage.sum() == 0 and method.window_usage.sum() == 5 * 15


def test_budgets_are_respected():
    full = N * D * 4
    for budget in (0.1, 0.25, 0.5, 1.0):
        for subspaces in (None, 2):
            for compression in (ProductQuantization(subspaces=subspaces, budget=budget),
                                DifferentiableVQ(subspaces=subspaces, budget=budget)):
                method = compression.build(specs()[0])
                s, k = plan_codebooks(N, D, budget, subspaces)
                assert (method.subspaces, method.codewords) == (s, k)
                assert pq_bytes(N, D, s, k) <= budget * full
            emb = build(ProductQuantization(subspaces=subspaces, budget=budget))
            assert sum(emb.memory().values()) <= budget * full
    assert plan_codebooks(N, D, 0.25) == (2, 12)  # widths D/S multiple of 4: 128 code bytes + 12 * 8 * 4 = 512
    assert plan_codebooks(1_000_000, 64, 0.05) == (8, 256)
    assert plan_codebooks(1_000_000, 64, 0.05, subspaces=4) == (4, 18750)  # int16 codes
    assert plan_codebooks(1_000, 64, 100.0, subspaces=1)[1] == 1_000  # never more codewords than rows
    sizes = [plan_codebooks(10_000, 32, b, 4)[1] for b in (0.05, 0.1, 0.2, 0.4)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    pq = ProductQuantization.from_table(low_rank(N, D), subspaces=None, budget=0.25)
    assert (pq.subspaces, pq.codewords, pq.budget) == (2, 12, None)


class _BadInit(Compression):
    def build(self, spec, stats=None):
        method = FullTable(spec)
        method.initial_weights = lambda: {"full": torch.zeros(2, 2)}
        return method


def test_config_errors_name_the_field_and_value():
    spec = specs()[0]
    with pytest.raises(ConfigError, match="subspaces=3 must be >= 1 and divide dim=8"):
        ProductQuantization(subspaces=3, codewords=4).build(spec)
    with pytest.raises(ConfigError, match=r"set either codewords \(16\) or budget \(0.1\)"):
        ProductQuantization(codewords=16, budget=0.1)
    with pytest.raises(ConfigError, match=r"codewords must be in \[2, 2147483647\], got 1"):
        DifferentiableVQ(codewords=1)
    with pytest.raises(ConfigError, match="budget must be > 0"):
        DifferentiableVQ(budget=0.0)
    with pytest.raises(ConfigError, match="subspaces=null needs a budget"):
        ProductQuantization(subspaces=None)
    with pytest.raises(ConfigError, match=r"table 'item': budget=0.01 allows 20 bytes .* 4 subspace\(s\) with 2 "
                                          r"codewords need 320 bytes"):
        ProductQuantization(budget=0.01).build(spec)
    with pytest.raises(ConfigError, match="source='kmeans' needs codes"):
        ProductQuantization(source="kmeans")
    with pytest.raises(ConfigError, match="source='random' takes no codes"):
        ProductQuantization(codes=torch.zeros(N, 4, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="source='stored' needs subspaces and codewords"):
        ProductQuantization(source="stored")
    with pytest.raises(ConfigError, match="source must be random, kmeans, vq or stored, got 'faiss'"):
        ProductQuantization(source="faiss")
    with pytest.raises(ConfigError, match="codes must be an integer"):
        ProductQuantization(source="vq", codes=torch.zeros(N, 4))
    with pytest.raises(ConfigError, match=r"table 'item': codes have shape \(10, 4\), expected \(64, 4\)"):
        ProductQuantization(source="vq", codewords=4, codes=torch.zeros(10, 4, dtype=torch.uint8)).build(spec)
    with pytest.raises(ConfigError, match="table 'item': codes reach 9, but codewords=4"):
        ProductQuantization(source="vq", codewords=4, codes=torch.full((N, 4), 9, dtype=torch.uint8)).build(spec)
    with pytest.raises(ConfigError, match=r"table 'item': codebooks have shape \(4, 3, 2\), expected \(4, 4, 2\)"):
        ProductQuantization(codewords=4, codebooks=torch.zeros(4, 3, 2)).build(spec)
    with pytest.raises(ConfigError, match="beta must be >= 0, got -1"):
        DifferentiableVQ(beta=-1)
    with pytest.raises(ConfigError, match="reseed_every must be >= 0"):
        DifferentiableVQ(reseed_every=-2)
    with pytest.raises(ConfigError, match=r"export needs \(64, 8\) vectors, got \(3, 8\)"):
        DifferentiableVQ(codewords=4).build(spec).export(torch.zeros(3, 8))
    with pytest.raises(ConfigError, match=r"weights must be a 2-D \(N, D\) table"):
        ProductQuantization.from_table(torch.zeros(8))
    with pytest.raises(ConfigError, match=r"table 'item': initial weights of plain table 'full' have shape \(2, 2\), "
                                          r"expected \(64, 8\)"):
        build(_BadInit())


def test_yaml_configs_instantiate():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.conftest import ROOT

    for name, kind in (("product_quantization", ProductQuantization), ("vq_e2e", DifferentiableVQ)):
        settings = instantiate(OmegaConf.load(ROOT / "conf" / "embedding" / f"{name}.yaml"))
        assert isinstance(settings, EmbeddingSettings) and isinstance(settings.default, kind)
        emb = CompressedEmbeddings([TableSpec("item", 300, 32, ("item",))], settings)
        assert emb(every_id(10))["item"].shape == (10, 32)
        assert math.isfinite(sum(emb.memory().values()))


def test_kmeans_codebooks_survive_dmp_materialisation():
    from recsys.training.distributed import ShardingConfig, TableOptimizer, shard

    pq = ProductQuantization.from_table(low_rank(N, D), subspaces=1, codewords=16)

    def sharded(kind):
        emb = CompressedEmbeddings(specs(), EmbeddingSettings(default=pq), device=torch.device("meta"))
        TableOptimizer("sgd", lr=0.1).apply(emb)
        return shard(emb, ShardingConfig({"default": [kind]}, column_shard_dim=4))

    torch.testing.assert_close(sharded("table_wise")(every_id())["item"], reconstruct(pq.codes, pq.codebooks),
                               rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"table 'item__codebook0' starts from given weights, so it must be "
                                          r"sharded whole \(table_wise or data_parallel\)"):
        sharded("column_wise")  # two column shards: their offsets are unknown to init_fn


def _vq_forwards_on_ranks(rank: int, world: int) -> list[dict]:
    """Four training forwards of an unsharded VQ collection (reseed_every=3) on this rank's batches."""
    emb = _toy_vq(reseed_every=3)
    method, found = emb.methods["item"], []
    for step in range(4):
        kjt = batch(10 * rank + step)
        emb(kjt)["item"].sum().backward()
        found.append({"calls": int(method.calls), "usage": method.usage.clone(), "window": method.window_usage.clone(),
                      "books": method.codebooks.detach().clone(), "ids": len(kjt.values())})
    return found


def test_on_two_ranks_vq_counts_every_ranks_batches_and_reseeds_by_batches():
    """W ranks count as one process reading their W batches: each forward adds W to ``calls`` and the usage of all
    the ranks' ids to ``usage`` (the same on every rank); a window of 3 batches ends within forwards 2 (batches 3-4)
    and 4 (batches 7-8), where the dead codewords are re-seeded and the usage starts again."""
    ranks = run_ranks(_vq_forwards_on_ranks)
    subspaces = 2
    for step in range(4):
        zero, one = ranks[0][step], ranks[1][step]
        assert zero["calls"] == one["calls"] == 2 * (step + 1)
        for key in ("usage", "window", "books"):
            assert torch.equal(zero[key], one[key]), (step, key)
        counted = subspaces * (zero["ids"] + one["ids"])  # this forward's ids, both ranks
        previous = 0 if step in (0, 1, 3) else float(ranks[0][step - 1]["usage"].sum())
        assert float(zero["usage"].sum()) == previous + counted, step
    assert torch.equal(ranks[0][1]["window"], ranks[0][0]["usage"])  # reseed at forward 2: forward 1's usage
    assert torch.equal(ranks[0][3]["window"], ranks[0][2]["usage"])  # and at forward 4: forwards 2 and 3
    assert torch.equal(ranks[0][2]["window"], ranks[0][1]["window"])  # none at forward 3
