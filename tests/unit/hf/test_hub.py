"""Hub ids resolve offline only: a snapshot already in the local HF cache is found, anything else is refused with
the cache named and how to fetch it once (automoe/hf/hub.py)."""

import pytest

from automoe.hf.hub import resolve_local

pytest.importorskip("huggingface_hub")


def _cache_snapshot(cache, repo_id: str, revision: str = "0" * 40):
    """The on-disk layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<revision>/...}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    return snapshot


def test_a_cached_hub_id_resolves_to_its_snapshot_and_a_path_to_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    snapshot = _cache_snapshot(tmp_path / "cache", "org/tiny-moe")
    assert resolve_local("org/tiny-moe", key="hf.init_from") == snapshot
    assert resolve_local(str(snapshot), key="hf.init_from") == snapshot


def test_an_uncached_hub_id_or_a_missing_path_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(
        ValueError, match=r"hf.init_from='org/absent' is not a local path.*hf download org/absent"
    ):
        resolve_local("org/absent", key="hf.init_from")
    with pytest.raises(ValueError, match=r"hf.init_from='/no/such/dir' does not exist"):
        resolve_local("/no/such/dir", key="hf.init_from")
