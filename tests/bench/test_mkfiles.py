"""bench/mkfiles.py, the scale benchmark's tree: deterministic, and the mutation it promises."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

import mkfiles

FILES = 2000


def contents(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under root."""
    return {rel: hashlib.sha256((root / rel).read_bytes()).hexdigest()
            for rel in mkfiles.list_files(str(root))}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mkfiles") / "tree"
    mkfiles.generate(str(root), FILES, seed=42)
    return root


def test_the_same_seed_makes_the_same_tree_and_another_seed_another(tree, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    mkfiles.generate(str(again), FILES, seed=42)
    mkfiles.generate(str(other), FILES, seed=43)

    digest = mkfiles.tree_digest(tree, metadata=True)
    assert mkfiles.tree_digest(again, metadata=True) == digest
    assert mkfiles.tree_digest(other, metadata=True) != digest


def test_the_tree_has_n_small_files_in_n_over_1000_folders_a_third_random(tree):
    rels = mkfiles.list_files(str(tree))
    assert len(rels) == FILES
    assert sorted(os.listdir(tree)) == ["d0000", "d0001"]
    sizes = [(tree / rel).stat().st_size for rel in rels]
    assert min(sizes) >= 50 and max(sizes) <= 3000
    randoms = sum(rel.endswith(mkfiles.RANDOM_EXTS) for rel in rels)
    assert 0.28 < randoms / FILES < 0.39
    text = next(rel for rel in rels if not rel.endswith(mkfiles.RANDOM_EXTS))
    assert (tree / text).read_bytes().startswith(f"# {text} ".encode())


def test_the_mutation_rewrites_one_percent_adds_and_deletes_half_a_percent(tree, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tree, a)
    shutil.copytree(tree, b)
    before = contents(a)

    made = mkfiles.mutate(str(a), seed=1)
    mkfiles.mutate(str(b), seed=1)

    after = contents(a)
    changed = [rel for rel in before.keys() & after.keys() if before[rel] != after[rel]]
    assert (len(changed), len(after.keys() - before.keys()),
            len(before.keys() - after.keys())) == (20, 10, 10)
    assert (made.changed, made.added, made.deleted) == mkfiles.mutation_counts(FILES)
    assert mkfiles.tree_digest(b, metadata=True) == mkfiles.tree_digest(a, metadata=True)
    assert mkfiles.tree_digest(a) != mkfiles.tree_digest(tree)
