"""The tuned-config cache: round trip, rejection of bad entries, key separation, location."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashoverlap.plan import PLAN_FORMAT_VERSION, PlanConfig, Problem
from flashoverlap.tuning import cache
from flashoverlap.tuning.cache import CacheKey, CacheWarning


def key(**overrides) -> CacheKey:
    problem = Problem(8192, 8192, 2048, "bfloat16", 4, "all_reduce")
    fields = dict(gpu_name="NVIDIA H100 80GB HBM3", num_sms=132, interconnect="nvlink",
                  nccl_version="2.21.5", torch_version="2.4.0", triton_version="3.2.0")
    fields.update(overrides)
    return cache.make_key(problem, **fields)


# 8192 rows in tile rows of 128, bands of 8: 8 bands.
CONFIG = PlanConfig(block_m=128, block_n=256, num_ctas=116, group_m=8, group_bands=(1, 3, 4))


def test_round_trip(tmp_path: Path):
    k = key()
    assert cache.lookup(k, directory=tmp_path) is None  # a miss is silent
    path = cache.store(k, CONFIG, predicted_ms=1.0, measured_ms=1.1, sequential_ms=1.3,
                       directory=tmp_path)
    assert path.parent == tmp_path and path.suffix == ".json"
    assert cache.lookup(k, directory=tmp_path) == CONFIG
    entry = cache.lookup_entry(k, directory=tmp_path)
    assert entry is not None and entry.key == k and entry.use_overlap
    assert (entry.predicted_ms, entry.measured_ms, entry.sequential_ms) == (1.0, 1.1, 1.3)
    # Overwrite: the newest entry wins, no temporaries are left behind.
    other = PlanConfig(block_m=128, block_n=128, num_ctas=124, group_bands=None)
    cache.store(k, other, predicted_ms=2.0, use_overlap=False, directory=tmp_path)
    assert cache.lookup(k, directory=tmp_path) == other
    assert cache.lookup_entry(k, directory=tmp_path).use_overlap is False
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    json.loads(path.read_text())  # plain JSON


def test_list_entries(tmp_path: Path):
    assert cache.list_entries(directory=tmp_path / "missing") == []
    for m in (4096, 1024, 2048):
        cache.store(key(nccl_version=str(m)), CONFIG, predicted_ms=m / 1000, directory=tmp_path)
    entries = cache.list_entries(directory=tmp_path)
    assert len(entries) == 3
    (tmp_path / "junk.json").write_text("{")
    with pytest.warns(CacheWarning):
        assert len(cache.list_entries(directory=tmp_path)) == 3


def _corrupt(tmp_path: Path, edit) -> CacheKey:
    k = key()
    path = cache.store(k, CONFIG, predicted_ms=1.0, directory=tmp_path)
    raw = json.loads(path.read_text())
    result = edit(raw)
    path.write_text(result if isinstance(result, str) else json.dumps(raw))
    return k


def _drop(d: dict, name: str) -> None:
    del d[name]


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


@pytest.mark.parametrize("edit, why", [
    (lambda r: r.update(schema_version=1), "schema version"),
    (lambda r: r.update(schema_version=3), "schema version"),
    (lambda r: r.update(schema_version=None), "schema version"),
    (lambda r: _drop(r, "schema_version"), "schema version"),
    (lambda r: _drop(r, "predicted_ms"), "malformed"),
    (lambda r: _drop(r["config"], "num_ctas"), "malformed"),
    (lambda r: r["config"].update(block_m="128"), "malformed"),
    (lambda r: r["config"].update(group_bands=[1, "2"]), "malformed"),
    (lambda r: r["config"].update(block_m=96), "malformed"),  # not a power of two
    (lambda r: r["config"].update(group_bands=[0, 3]), "malformed"),
    (lambda r: r["config"].update(group_bands=[1, 3, 5]), "does not fit"),  # 9 != 8 bands
    (lambda r: r["config"].update(group_m=4), "does not fit"),  # now 16 bands
    (lambda r: _rename(r["config"], "group_bands", "group_waves"), "malformed"),
    (lambda r: r.update(predicted_ms="fast"), "malformed"),
    (lambda r: r.update(use_overlap="yes"), "malformed"),
    (lambda r: r.update(surprise=1), "malformed"),  # unknown fields are rejected
    (lambda r: r["key"].update(M=1), "another key"),
    (lambda r: json.dumps(r)[:-40], "not valid JSON"),  # truncated file
    (lambda r: "[]", "schema version"),
    (lambda r: "", "not valid JSON"),
])
def test_bad_entries_warn_and_miss(tmp_path: Path, edit, why):
    k = _corrupt(tmp_path, edit)
    with pytest.warns(CacheWarning, match=why):
        assert cache.lookup(k, directory=tmp_path) is None


def test_schema_1_entry_is_a_clean_miss(tmp_path: Path):
    """An entry written by the wave-grouping tuner (schema 1, ``group_waves``) at the path
    of a current key: a warning and a miss, never an exception."""
    k = key()
    path = cache.entry_path(k, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "schema_version": 1, "key": k.model_dump(mode="json"),
        "config": {"block_m": 128, "block_n": 256, "num_ctas": 116, "group_m": 8,
                   "group_waves": [1, 3, 14]},
        "predicted_ms": 1.0, "measured_ms": None, "sequential_ms": None, "use_overlap": True,
        "created": "2026-01-01T00:00:00+00:00"}))
    with pytest.warns(CacheWarning, match="schema version 1"):
        assert cache.lookup_entry(k, directory=tmp_path) is None
    with pytest.warns(CacheWarning):
        assert cache.list_entries(directory=tmp_path) == []
    assert cache.SCHEMA_VERSION == 2


def test_bad_entry_is_replaced_by_store(tmp_path: Path):
    k = _corrupt(tmp_path, lambda r: r.update(schema_version=0))
    with pytest.warns(CacheWarning):
        assert cache.lookup(k, directory=tmp_path) is None
    cache.store(k, CONFIG, predicted_ms=1.0, directory=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cache.lookup(k, directory=tmp_path) == CONFIG


key_fields = st.fixed_dictionaries({
    "gpu_name": st.sampled_from(["NVIDIA H100 80GB HBM3", "NVIDIA H200", "H100"]),
    "num_sms": st.sampled_from([114, 132]),
    "world_size": st.sampled_from([1, 2, 4, 8]),
    "op": st.sampled_from(["all_reduce", "reduce_scatter"]),
    "dtype": st.sampled_from(["bfloat16", "float16"]),
    "M": st.sampled_from([1024, 8192, 8193]),
    "N": st.sampled_from([4096, 8192]),
    "K": st.sampled_from([2048, 7168]),
    "nccl_version": st.sampled_from(["2.21.5", "2.28.9"]),
    "torch_version": st.sampled_from(["2.4.0", "2.11.0"]),
    "triton_version": st.sampled_from(["3.2.0", "none"]),
    "interconnect": st.sampled_from(["nvlink", "pcie", "nvlink;NCCL_P2P_DISABLE=1"]),
    "nccl_cta_limit": st.sampled_from([None, 16, 32]),
    "plan_format": st.sampled_from([PLAN_FORMAT_VERSION, PLAN_FORMAT_VERSION + 1]),
    "kernels": st.sampled_from(["0123456789abcdef", "fedcba9876543210"]),
})


@settings(max_examples=200, deadline=None)
@given(key_fields, key_fields)
def test_distinct_keys_never_collide(a, b):
    ka, kb = CacheKey(**a), CacheKey(**b)
    assert (ka == kb) == (a == b)
    assert (cache.entry_path(ka, Path("/c")) == cache.entry_path(kb, Path("/c"))) == (a == b)


def test_every_key_field_matters():
    base = key()
    changed = {"gpu_name": "H200", "num_sms": 114, "world_size": 8, "op": "reduce_scatter",
               "dtype": "float16", "M": 1, "N": 1, "K": 1, "nccl_version": "x",
               "torch_version": "x", "triton_version": "x", "interconnect": "pcie",
               "nccl_cta_limit": 8, "plan_format": PLAN_FORMAT_VERSION + 1, "kernels": "x"}
    assert set(changed) == set(CacheKey.model_fields)
    digests = {base.digest()}
    for name, value in changed.items():
        digests.add(base.model_copy(update={name: value}).digest())
    assert len(digests) == len(changed) + 1


def test_kernels_signature_follows_the_kernel_sources(tmp_path, monkeypatch):
    """The key's ``kernels`` field digests flashoverlap/kernels/*.py: an edit to a kernel or
    to a per-shape choice gives another key (a tuned entry of the old kernels is a miss)."""
    import flashoverlap.kernels as kernels_pkg

    src = Path(kernels_pkg.__file__).parent
    fake_pkg = tmp_path / "flashoverlap"
    (fake_pkg / "tuning").mkdir(parents=True)
    (fake_pkg / "kernels").mkdir()
    for f in src.glob("*.py"):
        (fake_pkg / "kernels" / f.name).write_bytes(f.read_bytes())
    fake_file = fake_pkg / "tuning" / "cache.py"
    fake_file.write_text("")

    def signature():
        cache.kernels_signature.cache_clear()
        monkeypatch.setattr(cache, "__file__", str(fake_file))
        return cache.kernels_signature()

    try:
        same = signature()
        monkeypatch.undo()
        cache.kernels_signature.cache_clear()
        assert same == cache.kernels_signature()  # the copy digests like the package
        with open(fake_pkg / "kernels" / "__init__.py", "a") as f:
            f.write("\n# an edit\n")
        edited = signature()
        assert edited != same and len(edited) == 16
    finally:
        monkeypatch.undo()
        cache.kernels_signature.cache_clear()
    problem = Problem(4096, 1024, 512, "float16", 2, "reduce_scatter")
    k = cache.make_key(problem, gpu_name="g", num_sms=132, interconnect="nvlink",
                       nccl_version="2.21")
    assert k.digest() != k.model_copy(update={"kernels": edited}).digest()


def test_key_from_problem_and_interconnect_signature():
    problem = Problem(4096, 1024, 512, "float16", 2, "reduce_scatter")
    k = cache.make_key(problem, gpu_name="g", num_sms=132, interconnect="nvlink",
                       nccl_version="2.21")
    assert (k.M, k.N, k.K, k.dtype, k.world_size, k.op) == (4096, 1024, 512, "float16", 2,
                                                           "reduce_scatter")
    assert k.plan_format == PLAN_FORMAT_VERSION and k.torch_version  # installed version
    assert k.kernels == cache.kernels_signature() and len(k.kernels) == 16
    assert cache.interconnect_signature("pcie", {}) == "pcie"
    assert cache.interconnect_signature(
        "nvlink", {"NCCL_P2P_DISABLE": "1", "NCCL_ALGO": "Ring", "OTHER": "x"}
    ) == "nvlink;NCCL_P2P_DISABLE=1;NCCL_ALGO=Ring"


def test_env_var_location(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    assert cache.cache_dir() == tmp_path / "tuning"
    path = cache.store(key(), CONFIG, predicted_ms=1.0)
    assert path.parent == tmp_path / "tuning"
    assert cache.lookup(key()) == CONFIG
    monkeypatch.delenv(cache.CACHE_ENV)
    assert cache.cache_dir() != tmp_path / "tuning"
    assert "flashoverlap" in str(cache.cache_dir())


def test_failed_write_leaves_no_temporary(tmp_path: Path, monkeypatch):
    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(cache.os, "replace", boom)
    with pytest.raises(OSError):
        cache.store(key(), CONFIG, predicted_ms=1.0, directory=tmp_path)
    assert list(tmp_path.iterdir()) == []
