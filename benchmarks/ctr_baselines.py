"""Baselines of the CTR benchmark: plain-PyTorch DLRM, DCNv2 and DeepFM, and DeepCTR-Torch's DeepFM and DCN.

Both families train on the splits of one prepared CTR directory (``recsys.data.prepare``) with
early stopping on the validation AUC (the best epoch's weights are restored), score the test
split with scikit-learn, and return the same dict, so ``benchmarks/ctr.py`` can log them beside
our TorchRec models:

    model, library, test_auc, test_logloss, valid_auc, best_epoch, epochs_run,
    train_samples_per_second, inference_samples_per_second, train_seconds, parameters,
    embedding_bytes

``train_samples_per_second`` is training rows over the seconds spent in the epochs' training
loops (each library's own input pipeline included, validation excluded);
``inference_samples_per_second`` is test rows over the seconds to score the test split held in
memory. Neither function sets the number of torch threads: the caller does.

Shape letters: B batch, F sparse features, D embedding dim, N dense features.
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.batching import Batch, CTRBatcher, ParquetBatches
from recsys.data.dataset import PreparedData
from recsys.data.schemas import LABEL, CTRSchema
from recsys.errors import ConfigError

SHUFFLE_BUFFER = 1_000_000  # rows pooled by the plain models' training stream
HIDDEN = (400, 400, 400)


# --------------------------------------------------------------------------------------------
# Plain PyTorch models: one nn.EmbeddingBag (mode sum) per sparse feature, no TorchRec modules.
# --------------------------------------------------------------------------------------------


class EmbeddingBags(nn.Module):
    """One ``nn.EmbeddingBag`` (mode sum) per sparse feature: KeyedJaggedTensor -> (B, F, D).

    Args:
        vocab_sizes: rows of each feature's table, in the batch's key order.
        dim: D.
        sparse: sparse gradients (for ``torch.optim.Adagrad`` / ``SparseAdam`` on the tables).

    Example:
        >>> bags = EmbeddingBags({"user": 10, "item": 20}, dim=4)
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "item"], torch.tensor([1, 2, 3, 4]),
        ...                                           torch.tensor([1, 1, 1, 1]))
        >>> bags(kjt).shape
        torch.Size([2, 2, 4])
    """

    def __init__(self, vocab_sizes: dict[str, int], dim: int, sparse: bool = False) -> None:
        super().__init__()
        self.keys = list(vocab_sizes)
        self.tables = nn.ModuleList(nn.EmbeddingBag(n, dim, mode="sum", include_last_offset=True, sparse=sparse)
                                    for n in vocab_sizes.values())
        for table in self.tables:
            nn.init.normal_(table.weight, std=0.01)

    def forward(self, sparse: KeyedJaggedTensor) -> torch.Tensor:
        features = sparse.to_dict()
        return torch.stack([table(features[key].values(), features[key].offsets())
                            for key, table in zip(self.keys, self.tables)], dim=1)


def mlp(sizes: Sequence[int], last_relu: bool = True) -> nn.Sequential:
    """Linear layers ``sizes[0] -> sizes[1] -> ...`` with ReLU after each (after the last if ``last_relu``)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if last_relu or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PlainDeepFM(nn.Module):
    """DeepFM: first-order weights + FM pairwise term over the embeddings + an MLP; returns (B,) logits.

    The dense features enter the first-order term and the MLP (as in DeepCTR-Torch).

    Args:
        vocab_sizes: table rows per sparse feature, in the batch's key order.
        n_dense: N.
        dim: D.
        hidden: MLP layer widths.

    Example:
        >>> model = PlainDeepFM({"user": 10, "item": 20}, n_dense=1, dim=4, hidden=(8,))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "item"], torch.tensor([1, 2, 3, 4]),
        ...                                           torch.tensor([1, 1, 1, 1]))
        >>> model(Batch(kjt, torch.zeros(2, 1), torch.zeros(2))).shape
        torch.Size([2])
    """

    def __init__(self, vocab_sizes: dict[str, int], n_dense: int, dim: int, hidden: Sequence[int] = HIDDEN,
                 sparse: bool = False) -> None:
        super().__init__()
        self.embeddings = EmbeddingBags(vocab_sizes, dim, sparse)
        self.first_order = EmbeddingBags(vocab_sizes, 1, sparse)
        self.dense_linear = nn.Linear(n_dense, 1)  # with N = 0: the bias alone
        self.deep = mlp([len(vocab_sizes) * dim + n_dense, *hidden, 1], last_relu=False)

    def forward(self, batch: Batch) -> torch.Tensor:
        e = self.embeddings(batch.sparse)  # (B, F, D)
        first = self.first_order(batch.sparse).sum(dim=(1, 2)) + self.dense_linear(batch.dense).squeeze(1)
        fm = 0.5 * (e.sum(dim=1).pow(2) - e.pow(2).sum(dim=1)).sum(dim=1)
        return first + fm + self.deep(torch.cat([e.flatten(1), batch.dense], dim=1)).squeeze(1)


class CrossNetV2(nn.Module):
    """DCNv2's full-rank cross layers: ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``.

    Args:
        width: the input width.
        n_layers: number of cross layers.

    Example:
        >>> CrossNetV2(6, n_layers=2)(torch.ones(3, 6)).shape
        torch.Size([3, 6])
    """

    def __init__(self, width: int, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class PlainDCNv2(nn.Module):
    """DCNv2 (parallel): cross layers and an MLP over [flattened embeddings, dense]; returns (B,) logits.

    Args:
        vocab_sizes: table rows per sparse feature, in the batch's key order.
        n_dense: N.
        dim: D.
        hidden: MLP layer widths.
        cross_layers: number of full-rank cross layers.

    Example:
        >>> model = PlainDCNv2({"user": 10, "item": 20}, n_dense=1, dim=4, hidden=(8,))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "item"], torch.tensor([1, 2, 3, 4]),
        ...                                           torch.tensor([1, 1, 1, 1]))
        >>> model(Batch(kjt, torch.zeros(2, 1), torch.zeros(2))).shape
        torch.Size([2])
    """

    def __init__(self, vocab_sizes: dict[str, int], n_dense: int, dim: int, hidden: Sequence[int] = HIDDEN,
                 sparse: bool = False, cross_layers: int = 3) -> None:
        super().__init__()
        width = len(vocab_sizes) * dim + n_dense
        self.embeddings = EmbeddingBags(vocab_sizes, dim, sparse)
        self.cross = CrossNetV2(width, cross_layers)
        self.deep = mlp([width, *hidden])
        self.head = nn.Linear(width + (hidden[-1] if hidden else width), 1)

    def forward(self, batch: Batch) -> torch.Tensor:
        x0 = torch.cat([self.embeddings(batch.sparse).flatten(1), batch.dense], dim=1)
        return self.head(torch.cat([self.cross(x0), self.deep(x0)], dim=1)).squeeze(1)


class PlainDLRM(nn.Module):
    """DLRM: bottom MLP on the dense features, pairwise dot products, top MLP; returns (B,) logits.

    The bottom MLP maps the N dense features to one D-vector, which joins the F embeddings in the
    dot-product interaction; the top MLP reads that vector and the (F + 1) F / 2 dot products.
    Without dense features the bottom MLP reads a constant 1, so the vector is learned and its dot
    products with the embeddings act as first-order terms.

    Args:
        vocab_sizes: table rows per sparse feature, in the batch's key order.
        n_dense: N.
        dim: D.
        hidden: top MLP layer widths.
        bottom: bottom MLP hidden widths (the last layer has width D).

    Example:
        >>> model = PlainDLRM({"user": 10, "item": 20}, n_dense=0, dim=4, hidden=(8,))
        >>> kjt = KeyedJaggedTensor.from_lengths_sync(["user", "item"], torch.tensor([1, 2, 3, 4]),
        ...                                           torch.tensor([1, 1, 1, 1]))
        >>> model(Batch(kjt, torch.zeros(2, 0), torch.zeros(2))).shape
        torch.Size([2])
    """

    def __init__(self, vocab_sizes: dict[str, int], n_dense: int, dim: int, hidden: Sequence[int] = HIDDEN,
                 sparse: bool = False, bottom: Sequence[int] = (64,)) -> None:
        super().__init__()
        n = len(vocab_sizes) + 1
        self.embeddings = EmbeddingBags(vocab_sizes, dim, sparse)
        self.bottom = mlp([max(n_dense, 1), *bottom, dim])
        self.register_buffer("pairs", torch.triu_indices(n, n, offset=1), persistent=False)
        self.top = mlp([dim + n * (n - 1) // 2, *hidden, 1], last_relu=False)

    def forward(self, batch: Batch) -> torch.Tensor:
        dense = batch.dense if batch.dense.shape[1] else batch.dense.new_ones(len(batch), 1)
        x = self.bottom(dense)  # (B, D)
        z = torch.cat([x.unsqueeze(1), self.embeddings(batch.sparse)], dim=1)  # (B, F + 1, D)
        dots = torch.bmm(z, z.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        return self.top(torch.cat([x, dots], dim=1)).squeeze(1)


PLAIN_MODELS: dict[str, type[nn.Module]] = {"dlrm": PlainDLRM, "dcnv2": PlainDCNv2, "deepfm": PlainDeepFM}


# --------------------------------------------------------------------------------------------
# Shared: early stopping on the validation AUC, test metrics.
# --------------------------------------------------------------------------------------------


def _early_stopping(model: nn.Module, train_epoch: Callable[[int], int], predict_valid: Callable[[], np.ndarray],
                    valid_labels: np.ndarray, epochs: int, patience: int) -> dict:
    """Trains up to ``epochs`` epochs, stops after ``patience`` epochs without a better validation
    AUC and restores the best epoch's weights."""
    if epochs < 1 or patience < 1:
        raise ConfigError(f"epochs and patience must be >= 1, got epochs={epochs}, patience={patience}")
    best_auc, best_epoch, best_state, seconds, samples, epoch = -np.inf, 0, None, 0.0, 0, 0
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        samples += train_epoch(epoch)
        seconds += time.perf_counter() - start
        auc = roc_auc_score(valid_labels, predict_valid())
        if auc > best_auc:
            best_auc, best_epoch, best_state = auc, epoch, copy.deepcopy(model.state_dict())
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    return {"valid_auc": float(best_auc), "best_epoch": best_epoch, "epochs_run": epoch, "train_seconds": seconds,
            "train_samples_per_second": samples / seconds}


def _test_metrics(labels: np.ndarray, predict: Callable[[], np.ndarray]) -> dict:
    start = time.perf_counter()
    probs = predict()
    seconds = time.perf_counter() - start
    return {"test_auc": float(roc_auc_score(labels, probs)), "test_logloss": float(log_loss(labels, probs)),
            "inference_samples_per_second": len(labels) / seconds}


def _head(data: PreparedData, split: str, max_rows: int | None = None, columns: list[str] | None = None):
    """The first ``max_rows`` rows (all when None) of a prepared split, read row group by row group."""
    if max_rows is None:
        return pq.read_table(data.path(split), columns=columns)
    import pyarrow as pa
    parts, rows = [], 0
    for batch in pq.ParquetFile(data.path(split)).iter_batches(columns=columns):
        parts.append(batch.slice(0, max_rows - rows))
        rows += len(parts[-1])
        if rows >= max_rows:
            break
    return pa.Table.from_batches(parts)


def _labels(data: PreparedData, split: str, max_rows: int | None = None) -> np.ndarray:
    return _head(data, split, max_rows, [LABEL])[LABEL].to_numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------
# Plain PyTorch training.
# --------------------------------------------------------------------------------------------


def _plain_predict(model: nn.Module, batches: list[Batch]) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        probs = torch.cat([torch.sigmoid(model(batch)) for batch in batches]).numpy()
    model.train()
    return probs.astype(np.float64)


def train_plain(model_name: str, data: PreparedData, epochs: int = 30, batch_size: int = 1024, dim: int = 10,
                lr: float = 1e-3, seed: int = 0, *, hidden: Sequence[int] = HIDDEN, optimizer: str = "adam",
                patience: int = 3, eval_batch_size: int = 8192) -> dict:
    """Trains a plain-PyTorch DLRM, DCNv2 or DeepFM on ``data``'s train split and scores its test split.

    Batches come from ``ParquetBatches`` (shuffle buffer of SHUFFLE_BUFFER rows, reshuffled each
    epoch) as our ``Batch``; the loss is binary cross-entropy on the logits; the optimizer is
    ``torch.optim.Adam`` or ``torch.optim.Adagrad`` over all parameters (dense gradients).

    Args:
        model_name: ``dlrm``, ``dcnv2`` or ``deepfm``.
        data: a prepared CTR dataset with train, valid and test splits.
        epochs: maximum number of epochs.
        batch_size: training rows per step.
        dim: D, the embedding dimension of every table.
        lr: learning rate.
        seed: seed of the initialisation and of the shuffles.
        hidden: MLP widths (the top MLP for DLRM).
        optimizer: ``adam`` or ``adagrad``.
        patience: epochs without a better validation AUC before stopping.
        eval_batch_size: rows per scoring batch.

    Returns:
        The metrics dict described in the module docstring.

    Example:
        >>> train_plain("dcnv2", PreparedData.open("/tmp/frappe_ref/data/prepared/frappe"), dim=10)  # doctest: +SKIP
    """
    if model_name not in PLAIN_MODELS:
        raise ConfigError(f"unknown plain model {model_name!r}; expected one of {', '.join(PLAIN_MODELS)}")
    optimizers = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad}
    if optimizer not in optimizers:
        raise ConfigError(f"unknown optimizer {optimizer!r}; expected adam or adagrad")
    schema = data.ctr_schema
    torch.manual_seed(seed)
    model = PLAIN_MODELS[model_name]({k: data.vocab_sizes[k] for k in schema.sparse_features}, len(schema.dense),
                                     dim, hidden)
    opt = optimizers[optimizer](model.parameters(), lr=lr)
    to_batch = CTRBatcher(schema)
    held = {s: list(ParquetBatches(data.path(s), to_batch, eval_batch_size, prefetch=0)) for s in ("valid", "test")}

    def train_epoch(epoch: int) -> int:
        rows = 0
        for batch in ParquetBatches(data.path("train"), to_batch, batch_size, SHUFFLE_BUFFER, seed + epoch):
            loss = nn.functional.binary_cross_entropy_with_logits(model(batch), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            rows += len(batch)
        return rows

    fit = _early_stopping(model, train_epoch, lambda: _plain_predict(model, held["valid"]),
                          _labels(data, "valid"), epochs, patience)
    test = _test_metrics(_labels(data, "test"), lambda: _plain_predict(model, held["test"]))
    tables = [m for m in model.modules() if isinstance(m, nn.EmbeddingBag)]
    return {"model": model_name, "library": "torch", **test, **fit,
            "parameters": sum(p.numel() for p in model.parameters()),
            "embedding_bytes": sum(t.weight.numel() * t.weight.element_size() for t in tables)}


# --------------------------------------------------------------------------------------------
# DeepCTR-Torch.
# --------------------------------------------------------------------------------------------

_FLOAT32_EXACT = 2**24  # DeepCTR-Torch feeds ids through a float32 tensor: larger ids would be rounded


def _deepctr_inputs(data: PreparedData, split: str, schema: CTRSchema, maxlens: dict[str, int],
                    max_rows: int | None = None) -> dict:
    """A split (its first ``max_rows`` rows) as DeepCTR-Torch's input dict; multi-valued ids are shifted by 1 and
    padded with 0."""
    table = _head(data, split, max_rows)
    x = {n: table[n].to_numpy() for n in schema.sparse}
    x |= {n: table[n].to_numpy().astype(np.float32) for n in schema.dense}
    for n in schema.multi_valued:
        lists = table[n].combine_chunks()
        lengths = pc.list_value_length(lists).fill_null(0).to_numpy()
        rows = np.repeat(np.arange(len(lists)), lengths)
        positions = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        x[n] = np.zeros((len(lists), maxlens[n]), dtype=np.int64)
        x[n][rows, positions] = pc.list_flatten(lists).to_numpy() + 1
    return x


def train_deepctr(model_name: str, data: PreparedData, epochs: int = 30, batch_size: int = 1024, dim: int = 10,
                  seed: int = 0, dnn_hidden_units: Sequence[int] = HIDDEN, *, lr: float = 1e-3,
                  patience: int = 3, cross_num: int = 3, l2_reg_embedding: float = 1e-5, dnn_dropout: float = 0.0,
                  init_std: float = 1e-4, eval_batch_size: int = 8192, max_rows: int | None = None) -> dict:
    """Trains DeepCTR-Torch's DeepFM or DCN (full-rank "matrix" cross layers = DCNv2) on ``data``.

    The splits are loaded in memory (DeepCTR-Torch takes arrays): sparse columns are our vocabulary
    indices (``SparseFeat`` with ``data.vocab_sizes``), dense columns our transformed values
    (``DenseFeat``), multi-valued columns sum-pooled ``VarLenSparseFeat`` (ids + 1, 0 = padding).
    Each epoch is one ``model.fit(..., epochs=1)`` (its DataLoader shuffles with torch's global
    seed, set to ``seed + epoch``) with ``torch.optim.Adam``; DeepCTR-Torch's own regularisation
    (``l2_reg_embedding`` on the embeddings and first-order weights) applies.

    Args:
        model_name: ``DeepFM`` or ``DCN``.
        data: a prepared CTR dataset with train, valid and test splits.
        epochs: maximum number of epochs.
        batch_size: training rows per step.
        dim: embedding dimension.
        seed: seed of the initialisation and of the shuffles.
        dnn_hidden_units: DNN layer widths.
        lr: Adam's learning rate.
        patience: epochs without a better validation AUC before stopping.
        cross_num: cross layers of DCN.
        l2_reg_embedding: DeepCTR-Torch's L2 weight on the embeddings.
        dnn_dropout: DNN dropout rate.
        init_std: DeepCTR-Torch's initialisation std of the embeddings and DNN weights.
        eval_batch_size: rows per scoring batch.
        max_rows: use only the first rows of each split (e.g. to time a slice of a large file).

    Returns:
        The metrics dict described in the module docstring.

    Raises:
        ConfigError: unknown model, or a vocabulary too large for DeepCTR-Torch's float32 inputs.

    Example:
        >>> train_deepctr("DeepFM", PreparedData.open("/tmp/frappe_ref/data/prepared/frappe"))  # doctest: +SKIP
    """
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DCN, DeepFM

    if model_name not in ("DeepFM", "DCN"):
        raise ConfigError(f"unknown DeepCTR-Torch model {model_name!r}; expected DeepFM or DCN")
    schema, vocab = data.ctr_schema, data.vocab_sizes
    too_big = {n: vocab[n] for n in schema.sparse_features if vocab[n] + 1 > _FLOAT32_EXACT}
    if too_big:
        raise ConfigError(f"vocabularies {too_big} exceed 2^24 rows: DeepCTR-Torch passes ids as float32")
    maxlens = {n: max(int(pc.max(pc.list_value_length(pq.read_table(data.path(s), columns=[n])[n])).as_py() or 1)
                      for s in ("train", "valid", "test")) for n in schema.multi_valued}
    columns = [SparseFeat(n, vocabulary_size=vocab[n], embedding_dim=dim) for n in schema.sparse]
    columns += [VarLenSparseFeat(SparseFeat(n, vocabulary_size=vocab[n] + 1, embedding_dim=dim), maxlen=maxlens[n],
                                 combiner="sum") for n in schema.multi_valued]
    columns += [DenseFeat(n, 1) for n in schema.dense]
    common = dict(dnn_hidden_units=tuple(dnn_hidden_units), l2_reg_embedding=l2_reg_embedding, dnn_dropout=dnn_dropout,
                  init_std=init_std, seed=seed, task="binary", device="cpu")
    model = (DeepFM(columns, columns, **common) if model_name == "DeepFM"
             else DCN(columns, columns, cross_num=cross_num, cross_parameterization="matrix", **common))
    model.compile(torch.optim.Adam(model.parameters(), lr=lr), "binary_crossentropy")
    x = {s: _deepctr_inputs(data, s, schema, maxlens, max_rows) for s in ("train", "valid", "test")}
    y_train = _labels(data, "train", max_rows)

    def train_epoch(epoch: int) -> int:
        torch.manual_seed(seed + epoch)
        with contextlib.redirect_stdout(io.StringIO()):  # fit prints the device and the sample counts
            model.fit(x["train"], y_train, batch_size=batch_size, epochs=1, verbose=0, shuffle=True)
        return len(y_train)

    def predict(split: str) -> np.ndarray:
        return model.predict(x[split], batch_size=eval_batch_size).ravel()

    fit = _early_stopping(model, train_epoch, lambda: predict("valid"), _labels(data, "valid", max_rows), epochs,
                          patience)
    test = _test_metrics(_labels(data, "test", max_rows), lambda: predict("test"))
    tables = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return {"model": model_name, "library": "deepctr-torch", **test, **fit,
            "parameters": sum(p.numel() for p in model.parameters()),
            "embedding_bytes": sum(t.weight.numel() * t.weight.element_size() for t in tables)}
