"""A model package cannot run code when it loads: crafted ``meta.json`` entries fail with the key and the value named,
before any object is built, and no file on disk changes (issue 14)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.batch_score import batch_score
from recsys.embeddings.hashing import Hashing
from recsys.errors import ConfigError
from recsys.inference.export import package_model
from recsys.inference.package import META, from_config, packageable, to_config
from recsys.inference.scorers import load

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def packages(registered_mf, registered_ctr, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packages")
    return {name: package_model(r["model"], r["model"].data).save(root / name)
            for name, r in (("mf", registered_mf), ("ctr", registered_ctr))}


def crafted(source: Path, into: Path, key: str, value) -> Path:
    """A copy of package ``source`` whose ``meta.json`` has ``value`` at the dotted ``key``."""
    shutil.copytree(source, into)
    meta = json.loads((into / META).read_text())
    *parents, last = key.split(".")
    node = meta
    for part in parents:
        node = node[part]
    node[last] = value
    (into / META).write_text(json.dumps(meta))
    return into


def payloads(victim: Path, created: Path) -> dict[str, tuple[str, object, str]]:
    """name -> (key in meta.json, crafted value, text the error must contain)."""
    hashing = "recsys.embeddings.hashing.Hashing"
    return {
        "shutil.copyfile": ("build.settings.default",
                            {"_target_": "shutil.copyfile", "src": str(victim), "dst": str(created)},
                            "build.settings.default._target_='shutil.copyfile'"),
        "builtins.open": ("build.settings.default", {"_target_": "builtins.open", "file": str(victim), "mode": "w"},
                          "build.settings.default._target_='builtins.open'"),
        "os.makedirs": ("build.settings.tables", {"item": {"_target_": "os.makedirs", "name": str(created)}},
                        "build.settings.tables.item._target_='os.makedirs'"),
        "importlib.import_module": ("build.settings.default", {"_target_": "importlib.import_module", "name": "os"},
                                    "'importlib.import_module'"),
        "nested target": ("build.settings.default",
                          {"_target_": hashing, "rows": {"_target_": "builtins.open", "file": str(victim), "mode": "w"}},
                          "build.settings.default.rows._target_='builtins.open'"),
        "partial of a builtin": ("build.settings.default",
                                 {"_target_": "shutil.rmtree", "_partial_": True, "path": str(victim.parent)},
                                 "'shutil.rmtree'"),
        "partial of a method": ("build.settings.default", {"_target_": hashing, "_partial_": True, "rows": 10},
                                "build.settings.default._partial_=True is not allowed"),
        "functools.partial": ("build.settings.default",
                              {"_target_": "functools.partial", "_args_": ["shutil.rmtree", str(victim.parent)]},
                              "'functools.partial'"),
        "hydra args": ("build.settings.default", {"_target_": hashing, "_args_": [str(victim)]},
                       "build.settings.default._args_="),
        "unknown parameter": ("build.settings.default", {"_target_": hashing, "path": str(victim)},
                              "build.settings.default.path="),
        "wrong type": ("build.settings.default", {"_target_": hashing, "rows": "100"},
                       "build.settings.default.rows='100' is not a int | None"),
    }


CASES = sorted(payloads(Path("v"), Path("c")))


@pytest.mark.parametrize("case", CASES)
def test_a_crafted_package_fails_to_load_and_changes_no_file(case, packages, tmp_path):
    victim, created = tmp_path / "victim.txt", tmp_path / "created"
    victim.write_text("keep me")
    key, value, message = payloads(victim, created)[case]
    package = crafted(packages["mf"], tmp_path / "crafted", key, value)
    with pytest.raises(ConfigError) as error:
        load(package)
    assert message in str(error.value)
    assert victim.read_text() == "keep me" and not created.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted", "victim.txt"]


def test_batch_scoring_a_crafted_package_writes_nothing(packages, tmp_path):
    victim, created = tmp_path / "victim.txt", tmp_path / "created"
    victim.write_text("keep me")
    key, value, message = payloads(victim, created)["shutil.copyfile"]
    package = crafted(packages["mf"], tmp_path / "crafted", key, value)
    pq.write_table(pa.table({"user_id": [1, 2, 3]}), tmp_path / "users.parquet")
    with pytest.raises(ConfigError, match="is not a class a model package may name"):
        batch_score(f"paths.root={tmp_path}", f"model.uri={package}", f"input={tmp_path / 'users.parquet'}",
                    f"output={tmp_path / 'out'}", "progress=false")
    assert victim.read_text() == "keep me" and not created.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.parquet"))


@pytest.mark.parametrize("value", [{"_target_": "builtins.open", "_partial_": True, "file": "x", "mode": "w"},
                                   {"_target_": "recsys.models.ctr.dlrm.DLRM", "bottom": [8]},
                                   {"_target_": "recsys.models.ctr.dlrm.DLRM", "_partial_": 1, "bottom": [8]}])
def test_the_ctr_network_factory_is_an_allowed_partial_only(value, packages, tmp_path):
    package = crafted(packages["ctr"], tmp_path / "crafted", "build.model", value)
    with pytest.raises(ConfigError, match=r"build\.model\._(target|partial)_="):
        load(package)


def test_unknown_ctr_build_entries_are_refused(packages, tmp_path):
    package = crafted(packages["ctr"], tmp_path / "crafted", "build.device", "cuda")
    with pytest.raises(ConfigError, match=r"build has unknown entries \['device'\]"):
        load(package)


def test_real_packages_still_load(packages):
    assert load(packages["mf"]).family == "mf" and load(packages["ctr"]).family == "ctr"


def test_every_allowed_class_round_trips_and_nothing_else_is_stored():
    settings = from_config(to_config(Hashing(rows=7, budget=None, seed=3)), "x")
    assert settings == Hashing(rows=7, budget=None, seed=3)
    assert all(name.startswith("recsys.") for name in packageable())
    with pytest.raises(ConfigError, match="cannot store a type"):
        to_config(pa.Table)

    @dataclasses.dataclass
    class Foreign:
        path: str = "/etc/passwd"

    with pytest.raises(ConfigError, match="Foreign cannot be stored in a model package as an object"):
        to_config(Foreign())


@pytest.mark.parametrize("family", ["mf", "ctr"])
@pytest.mark.parametrize("damage", ["missing", "shape", "extra"])
def test_weights_that_do_not_match_the_config_are_named(family, damage, packages, tmp_path):
    """Issue 15: a package whose weights do not match its config fails at load, naming the tensor and the shape."""
    from safetensors.torch import load_file, save_file

    from recsys.inference.package import WEIGHTS

    package = crafted(packages[family], tmp_path / "damaged", "metrics", {})
    tensors = load_file(str(package / WEIGHTS))
    table = next(k for k in tensors if k.startswith("model.") and k.endswith(".weight") and tensors[k].dim() == 2)
    shape = tuple(tensors[table].shape)
    if damage == "missing":
        del tensors[table]
        message = f"'{table}' is missing (expected shape {shape})"
    elif damage == "shape":
        tensors[table] = tensors[table][:-1].clone()
        message = f"'{table}' has shape {(shape[0] - 1, shape[1])}, the config builds {shape}"
    else:
        tensors["model.embeddings.surplus"] = torch.zeros(3)
        message = "'model.embeddings.surplus' is not part of this model"
    save_file(tensors, str(package / WEIGHTS))
    with pytest.raises(ConfigError, match="the package's weights do not match its config") as error:
        load(package)
    assert message in str(error.value)
